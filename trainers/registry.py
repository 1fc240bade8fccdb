"""Placeholder for ``nnUNetv2_dmoe_list_trainers`` (the trainer registry replaces it): prints the trainer names of
:mod:`nnunet_dmoe.trainers`, one per line."""


def list_trainers_entry_point():
    import argparse

    parser = argparse.ArgumentParser(
        description="List the nnU-Net trainers this plugin offers (use them with nnUNetv2_train / nnUNetv2_predict "
                    "-tr NAME).")
    parser.parse_args()
    import nnunet_dmoe.trainers as trainers

    for name in trainers.__all__:
        print(name)
