from qcompile.cli import main

raise SystemExit(main())
