from envfs.cli import main

raise SystemExit(main())
