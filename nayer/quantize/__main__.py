"""`python -m nayer.quantize`: see nayer/quantize/app.py for the commands, `--help` for every key."""

from nayer.quantize.app import main

if __name__ == "__main__":
    main()
