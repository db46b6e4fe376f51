// A model's decoder layers in one call, for a step whose rows all decode (one token each): every
// layer's norms, projections, rotary + KV write, attention and MLP run here one op after another,
// without returning to Python between them. At batch 1 the ops are fast enough that the Python
// between them decided the step (SmolLM2-135M, one thread: ~3.3 ms of a 10 ms token, across 30
// layers). The ops and their order are the model's with the kernels on (_model.py: Block,
// Attention, MLP, Proj; _kernels.linear), so the results are the same bits; the model builds the
// stack once (Transformer.decode_stack) and runs it for decode-only steps.
//
//   Matrix(kind, w, scales?, mins?, bias?, bits, group)
//       "float": w [N, K] in the activations' dtype; "tiles" / "rows": w the quantized matrix in
//       the tiled / row layout (qmm.cpp) with its scales (and mins)
//   Proj(matrices, sizes)     one matrix whose output splits into `sizes`, or one matrix per size
//   Layer(input_norm, post_norm, eps, qkv, o, gate_up, down, q_norm?, k_norm?, heads, kv_heads,
//         head_dim, window, scale)                   window <= 0: none (decode_attention's)
//   DecodeStack(layers, mv_rows, decode_rows).run(h, cos, sin, positions, k_caches, v_caches,
//         kv_slots, kv_pos, decode_slots?, decode_lens) -> (h, delta)
//       h the residual stream after the last layer's attention, delta the last MLP's output
//       (not yet added: the model's final norm takes both); mv_rows and decode_rows are the
//       model's limits for mv_bf16 and the row layout's in-register matmul (_kernels.MV_ROWS,
//       DECODE_ROWS)
#include <ATen/ATen.h>
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "ops.h"

namespace {

using at::Tensor;
using Opt = c10::optional<Tensor>;

struct Matrix {
  enum class Kind { Float, Tiles, Rows };
  Kind kind;
  Tensor w;
  Opt scales, mins, bias;
  int64_t bits, group;

  Matrix(const std::string& k, Tensor w_, Opt scales_, Opt mins_, Opt bias_, int64_t bits_, int64_t group_)
      : kind(k == "float" ? Kind::Float : k == "tiles" ? Kind::Tiles : Kind::Rows),
        w(std::move(w_)), scales(std::move(scales_)), mins(std::move(mins_)), bias(std::move(bias_)),
        bits(bits_), group(group_) {
    TORCH_CHECK(k == "float" || k == "tiles" || k == "rows", "Matrix: kind must be float, tiles or rows, got ", k);
    TORCH_CHECK(kind == Kind::Float || scales, "Matrix: a quantized matrix needs its scales");
    TORCH_CHECK(w.device().is_cpu(), "Matrix: CPU tensors only");
  }
};

struct Proj {
  std::vector<Matrix> parts;
  std::vector<int64_t> sizes;

  Proj(std::vector<Matrix> parts_, std::vector<int64_t> sizes_) : parts(std::move(parts_)), sizes(std::move(sizes_)) {
    TORCH_CHECK(!sizes.empty() && (parts.size() == 1 || parts.size() == sizes.size()),
                "Proj: one matrix, or one per size (", sizes.size(), " sizes, ", parts.size(), " matrices)");
  }
};

struct Layer {
  Tensor input_norm, post_norm;
  double eps;
  Proj qkv, o, gate_up, down;
  Opt q_norm, k_norm;
  int64_t heads, kv_heads, head_dim, window;
  double scale;

  Layer(Tensor input_norm_, Tensor post_norm_, double eps_, Proj qkv_, Proj o_, Proj gate_up_, Proj down_,
        Opt q_norm_, Opt k_norm_, int64_t heads_, int64_t kv_heads_, int64_t head_dim_, int64_t window_,
        double scale_)
      : input_norm(std::move(input_norm_)), post_norm(std::move(post_norm_)), eps(eps_), qkv(std::move(qkv_)),
        o(std::move(o_)), gate_up(std::move(gate_up_)), down(std::move(down_)), q_norm(std::move(q_norm_)),
        k_norm(std::move(k_norm_)), heads(heads_), kv_heads(kv_heads_), head_dim(head_dim_), window(window_),
        scale(scale_) {
    TORCH_CHECK(qkv.sizes.size() == 3 && gate_up.sizes.size() == 2 && o.sizes.size() == 1 && down.sizes.size() == 1,
                "Layer: qkv splits in 3, gate_up in 2, o and down are one matrix each");
    TORCH_CHECK(bool(q_norm) == bool(k_norm), "Layer: q_norm and k_norm come together");
  }
};

// RMSNorm over the last dimension as the model's torch path computes it (statistics in float32):
// the q/k norms of [rows, heads, D], which the fused norm (2-D rows) does not take
Tensor torch_rms_norm(const Tensor& x, const Tensor& w, double eps) {
  const bool f32 = x.scalar_type() == at::kFloat;
  Tensor h = f32 ? x : x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean({-1}, true) + eps);
  return w * (f32 ? h : h.to(x.scalar_type()));
}

class DecodeStack {
 public:
  DecodeStack(std::vector<Layer> layers, int64_t mv_rows, int64_t decode_rows)
      : layers_(std::move(layers)), mv_rows_(mv_rows), decode_rows_(decode_rows) {
    TORCH_CHECK(!layers_.empty(), "DecodeStack: no layers");
  }

  std::tuple<Tensor, Tensor> run(Tensor h, const Tensor& cos, const Tensor& sin, const Tensor& positions,
                                 const std::vector<Tensor>& k_caches, const std::vector<Tensor>& v_caches,
                                 const Tensor& kv_slots, const Tensor& kv_pos, const Opt& decode_slots,
                                 const Tensor& decode_lens) const {
    TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "DecodeStack.run: ",
                layers_.size(), " layers need as many k and v caches (got ", k_caches.size(), ", ", v_caches.size(), ")");
    TORCH_CHECK(h.dim() == 2 && positions.numel() == h.size(0) && kv_slots.numel() == h.size(0),
                "DecodeStack.run: every row decodes (h [rows, hidden], one position and slot a row)");
    Opt delta;
    Tensor x;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      if (delta) std::tie(x, h) = zs::step::add_rms_norm(*delta, h, l.input_norm, l.eps);
      else x = std::get<0>(zs::step::add_rms_norm(h, c10::nullopt, l.input_norm, l.eps));
      const Tensor a = attention(l, x, cos, sin, positions, k_caches[i], v_caches[i], kv_slots, kv_pos, decode_slots,
                                 decode_lens);
      std::tie(x, h) = zs::step::add_rms_norm(a, h, l.post_norm, l.eps);
      const std::vector<Tensor> gu = project(l.gate_up, x);
      delta = project(l.down, zs::step::silu_mul(gu[0], gu[1]))[0];
    }
    return {h, *delta};
  }

 private:
  std::vector<Layer> layers_;
  int64_t mv_rows_, decode_rows_;

  // _model.Proj._matmul and _kernels.linear, for the CPU with the kernels built
  Tensor matmul(const Matrix& m, const Tensor& x) const {
    if (m.kind == Matrix::Kind::Float) {
      if (x.size(0) <= mv_rows_ && x.scalar_type() == at::kBFloat16) return zs::step::mv_bf16(x, m.w, m.bias);
      return at::linear(x, m.w, m.bias);
    }
    if (m.kind == Matrix::Kind::Tiles || x.size(0) <= decode_rows_) {
      const bool f32 = x.scalar_type() == at::kFloat;
      const Tensor xf = f32 ? x : x.to(at::kFloat);
      Tensor y = m.kind == Matrix::Kind::Tiles ? zs::quant::qmm_tiles(xf, m.w, *m.scales, m.mins, m.bits, m.group)
                                               : zs::quant::qmm(xf, m.w, *m.scales, m.mins, m.bits, m.group);
      if (m.bias) y = y + *m.bias;
      return f32 ? y : y.to(x.scalar_type());
    }
    return at::linear(x, zs::quant::dequant(m.w, *m.scales, m.mins, m.bits, m.group).to(x.scalar_type()), m.bias);
  }

  std::vector<Tensor> project(const Proj& p, const Tensor& x) const {
    if (p.parts.size() == 1) {
      Tensor y = matmul(p.parts[0], x);
      if (p.sizes.size() == 1) return {y};
      return y.split_with_sizes(p.sizes, -1);
    }
    std::vector<Tensor> out;
    for (const Matrix& m : p.parts) out.push_back(matmul(m, x));
    return out;
  }

  Tensor attention(const Layer& l, const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& positions,
                   const Tensor& k_cache, const Tensor& v_cache, const Tensor& kv_slots, const Tensor& kv_pos,
                   const Opt& decode_slots, const Tensor& decode_lens) const {
    const int64_t T = x.size(0);
    const std::vector<Tensor> qkv = project(l.qkv, x);
    Tensor q = qkv[0].view({T, l.heads, l.head_dim});
    Tensor k = qkv[1].view({T, l.kv_heads, l.head_dim});
    const Tensor v = qkv[2].view({T, l.kv_heads, l.head_dim});
    if (l.q_norm) {
      q = torch_rms_norm(q, *l.q_norm, l.eps);
      k = torch_rms_norm(k, *l.k_norm, l.eps);
    }
    zs::step::rope_write_(q, k, v, cos, sin, positions, k_cache, v_cache, kv_slots, kv_pos);
    const Tensor out = zs::step::decode_attention(q, k_cache, v_cache, decode_slots, decode_lens, l.window, l.scale);
    return project(l.o, out)[0];
  }
};

}  // namespace

void bind_layers(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Matrix>(m, "Matrix")
      .def(py::init<const std::string&, Tensor, Opt, Opt, Opt, int64_t, int64_t>(), py::arg("kind"), py::arg("w"),
           py::arg("scales") = py::none(), py::arg("mins") = py::none(), py::arg("bias") = py::none(),
           py::arg("bits") = 0, py::arg("group") = 0);
  py::class_<Proj>(m, "Proj").def(py::init<std::vector<Matrix>, std::vector<int64_t>>(), py::arg("matrices"),
                                  py::arg("sizes"));
  py::class_<Layer>(m, "Layer")
      .def(py::init<Tensor, Tensor, double, Proj, Proj, Proj, Proj, Opt, Opt, int64_t, int64_t, int64_t, int64_t,
                    double>(),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("eps"), py::arg("qkv"), py::arg("o"),
           py::arg("gate_up"), py::arg("down"), py::arg("q_norm"), py::arg("k_norm"), py::arg("heads"),
           py::arg("kv_heads"), py::arg("head_dim"), py::arg("window"), py::arg("scale"));
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<std::vector<Layer>, int64_t, int64_t>(), py::arg("layers"), py::arg("mv_rows"),
           py::arg("decode_rows"))
      .def("run", &DecodeStack::run, py::call_guard<py::gil_scoped_release>(), py::arg("h"), py::arg("cos"),
           py::arg("sin"), py::arg("positions"), py::arg("k_caches"), py::arg("v_caches"), py::arg("kv_slots"),
           py::arg("kv_pos"), py::arg("decode_slots"), py::arg("decode_lens"));
}
