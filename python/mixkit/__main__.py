from mixkit.cli import main

raise SystemExit(main())
