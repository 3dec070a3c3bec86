"""Launch the Gradio demo: `python demo/app.py [--checkpoint C] [--host H] [--port P]`.

The same as `captioner demo ...`; kept as a script for hosts (e.g. Spaces) that run app.py.
"""
import sys

from captioner.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
