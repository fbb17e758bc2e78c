"""python -m experiments.sweeps table1|table2 --workdir=DIR: print the grid's commands."""

from experiments.sweeps import main

main()
