"""``python -m fastdiff.cli``: the same as the ``fastdiff`` command."""

from fastdiff.cli import main

raise SystemExit(main())
