from zerostart.cli import main

raise SystemExit(main())
