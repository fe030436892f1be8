"""The commands, `python -m nanoft <command>` (nanoft/__main__.py): memory (the estimator, memory/), check,
export, merge, plot, reward. Leaves: nothing in nanoft imports them."""
