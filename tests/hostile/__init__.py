"""The hostile-peer suite: attacks on a real node, each bounded in time and in what it may
cost the node, asserting the limits of docs/security.md. Marked `hostile`."""
