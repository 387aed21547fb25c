"""`tandem bench chaos`: faults injected into the whole running system, and the proof that
nothing was lost, duplicated, hung or left behind (`run.run_chaos`)."""
