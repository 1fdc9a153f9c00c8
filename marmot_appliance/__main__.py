from marmot_appliance.cli import main

raise SystemExit(main())
