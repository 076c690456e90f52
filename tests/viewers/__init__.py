"""A Node.js harness that reads cadnode's results the way viewers do (OHIF: cornerstone3D's
adapters, dcmjs), and `node.py` to run it from the tests. `make viewers` installs it."""
