"""`python -m mpinn ...` -> cli.main()."""
import sys

from .cli import main

sys.exit(main())
