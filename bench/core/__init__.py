"""One way to time, describe the machine, write results and take arguments, for every benchmark."""
