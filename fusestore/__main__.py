from fusestore.cli import main

raise SystemExit(main())
