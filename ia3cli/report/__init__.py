"""What a person reads: the console, the run report and the ``ia3 runs`` listing."""
