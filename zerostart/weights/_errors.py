"""The weights package's errors, in one place: a malformed checkpoint (``WeightsError``), a
ready image that cannot be used (``ImageError``), a remote source that cannot be read
(``SourceError``), a cache that cannot hold an object (``CacheFull``)."""


class WeightsError(ValueError):
    """A checkpoint is malformed, incomplete or unsupported. The message names the file and,
    where one is involved, the tensor."""


class ImageError(ValueError):
    """An image is missing, malformed, corrupt or incompatible; the message says which."""


class ImageIncompatible(ImageError):
    """The image was written for another device, dtype, config or software version."""


class SourceError(OSError):
    """A remote object could not be read (after retries), was refused, or changed mid-load."""


class ObjectChanged(SourceError):
    """The object's ETag / Last-Modified changed between two reads of one load."""


class CacheFull(OSError):
    """The cache's disk or size cap cannot hold an object; the load goes on without caching."""
