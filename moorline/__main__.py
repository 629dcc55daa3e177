from moorline.cli import main

raise SystemExit(main())
