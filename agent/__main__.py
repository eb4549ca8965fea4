"""`python -m agent` is `authz-agent`."""

from agent.cli import main

raise SystemExit(main())
