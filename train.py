"""Train and test one point of the grid dataset x backbone x decomposition.

    python train.py data=surface_defect decomp=none
    python train.py -m hparams_search=rank_svd

All options: python train.py --help; configs live in conf/.
"""

from lrk.cli import main

if __name__ == "__main__":
    main()
