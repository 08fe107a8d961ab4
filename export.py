"""Export a stage's trained model as a SavedModel that plain TensorFlow loads.

  python export.py --run_dir runs/E_2_2 --out exported/E_2_2
  python localise.py --saved_model exported/E_2_2 --panorama pano.jpg --tiles tiles/

The SavedModel takes decoded uint8 RGB images (0-255, any size: resized inside) and preprocesses them itself;
its signatures (serving_default, embed_panorama, embed_tile, metadata) are listed in docs/serving.md.
"""
import sys

from geoloc import cli

if __name__ == '__main__':
    cli.setup_environment(sys.argv)  # before TensorFlow loads

from geoloc.serve import commands  # noqa: E402


def main(argv=None):
    return commands.main(commands.export, argv, __doc__)


if __name__ == '__main__':
    sys.exit(main())
