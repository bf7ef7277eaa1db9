from rapidserve.cli import main

raise SystemExit(main())
