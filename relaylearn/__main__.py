from relaylearn.cli import main

raise SystemExit(main())
