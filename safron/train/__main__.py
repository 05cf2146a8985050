"""python -m safron.train: the same as safron-train."""

if __name__ == "__main__":
    import sys

    from ..cli.train import main

    sys.exit(main())
