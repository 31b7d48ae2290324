"""`python -m lowrank_pref.ui`: the app, as `python app.py` starts it."""

from . import main

main()
