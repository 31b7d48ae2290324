"""lowrank-pref in a browser tab: `python app.py` (http://127.0.0.1:7860), or unchanged as a Hugging Face Space.

Locally it listens on 127.0.0.1 only (--host 0.0.0.0 to share it on your network); in a Space (SPACE_ID set) on
0.0.0.0, as Spaces require. Runs are kept in ./runs (or $LOWRANK_PREF_RUNS; /data/runs in a Space with storage).
"""

from lowrank_pref.ui import main

if __name__ == "__main__":
    main()
