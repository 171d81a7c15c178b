"""`python -m polykv_search` runs the command-line interface."""

from polykv_search.cli import main

if __name__ == "__main__":
    main()
