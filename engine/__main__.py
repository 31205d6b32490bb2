from engine.console import main

raise SystemExit(main())
