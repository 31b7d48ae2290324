"""lowrank-pref in a browser tab: `python app.py` (http://127.0.0.1:7860), or unchanged as a Hugging Face Space.

Locally it listens on 127.0.0.1 only and every run and local path is the user's; in a Space (SPACE_ID set) it
listens on 0.0.0.0, as Spaces require, in public mode (also `python app.py --public`): each visitor sees and controls
only their own runs, and data comes from uploads and hub ids only (README, "Running it in public"). Runs are kept in
./runs (or $LOWRANK_PREF_RUNS; /data/runs in a Space with storage). `python app.py --help` lists the options.
"""

from lowrank_pref.ui import main

if __name__ == "__main__":
    main()
