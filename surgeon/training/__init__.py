"""The minimal trainer behind ``surgeon train``: sample order, checkpoints, the loop."""
