from qfl.cli import main

raise SystemExit(main())
