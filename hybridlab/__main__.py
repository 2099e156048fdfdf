from hybridlab.core.cli import main

raise SystemExit(main())
