from warmpool.cli.main import main

raise SystemExit(main())
