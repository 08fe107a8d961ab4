"""Where was this panorama taken? Rank aerial tiles against it and localise it in the best one.

  python localise.py --run_dir runs/E_2_2 --panorama pano.jpg --tiles /data/VIGOR/Chicago/satellite
  python localise.py --saved_model exported/E_2_2 --panorama pano.jpg --tiles tiles/ --json answer.json \
      --picture answer.png

Any stage's run directory (its latest checkpoint, with its config.json) or a SavedModel from export.py.
Tiles are named as VIGOR names them, satellite_<lat>_<lon>.png; tens of thousands are streamed in batches.
Prints the position (lat, lon), the 1-sigma ellipse in metres for stages with a covariance head (E_2_2, E_3),
the best tiles with their scores; --json writes the same, --picture draws it. Details: docs/serving.md.
"""
import sys

from geoloc import cli

if __name__ == '__main__':
    cli.setup_environment(sys.argv)  # before TensorFlow loads

from geoloc.serve import commands  # noqa: E402


def main(argv=None):
    return commands.main(commands.localise, argv, __doc__)


if __name__ == '__main__':
    sys.exit(main())
