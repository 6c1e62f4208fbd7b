"""python -m tools.import_notebook: the `dist-gpt-import-notebook` command, from the repository root
(see dist_gpt/import_notebook.py).

    python -m tools.import_notebook model-01.pkl --vocab vocab.txt --out runs/notebook-import
"""

import sys

from dist_gpt.import_notebook import main

if __name__ == "__main__":
    sys.exit(main())
