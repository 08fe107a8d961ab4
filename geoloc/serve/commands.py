"""The command lines of localise.py and export.py, and their one way to fail: bad input of any kind (a flag, a
file, a run directory, a SavedModel) ends in one line `error: ...` on stderr and exit status 2, as the stage
scripts do (geoloc/cli.py). Importing this module loads no TensorFlow."""
import argparse
import sys

from geoloc import errors


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (ConfigError) like every other refusal."""

    def error(self, message):
        raise errors.ConfigError(message)


def localise_parser(doc):
    p = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument('--run_dir', help="a stage's run directory: its latest checkpoint, with its config.json")
    model.add_argument('--saved_model', help='a SavedModel directory written by export.py')
    p.add_argument('--panorama', required=True, help='a north-aligned equirectangular panorama (width = 2 x '
                   'height, JPEG or PNG, any size not below the model\'s input)')
    p.add_argument('--tiles', nargs='+', required=True, metavar='DIR_OR_FILE',
                   help='aerial tiles, named satellite_<lat>_<lon>.png as in VIGOR: folders (their .png / .jpg '
                        'files) or files')
    p.add_argument('--yaw', type=float, default=None, help='the panorama\'s heading when it is not north-aligned: '
                   'its centre column looks DEG clockwise from north (--test\'s yaw convention); rolled back to '
                   'north before anything else')
    p.add_argument('--mpp', type=float, default=None, help="the tiles' ground resolution, metres per pixel of the "
                   "files (default VIGOR's: 0.114 m/px of a 640-px tile, whatever the file's size)")
    p.add_argument('--top_k', type=int, default=5, help='tiles listed in the answer (default 5)')
    p.add_argument('--batch', type=int, default=32, help='tiles embedded per batch (default 32)')
    p.add_argument('--stage', default='', help='refuse a model of any other stage (e.g. E_2_2, to be sure of a '
                   'covariance)')
    p.add_argument('--json', default='', help='also write the answer as JSON here')
    p.add_argument('--picture', default='', help='also draw the panorama over the best tile with the point and '
                   'its 1-sigma / 2-sigma ellipses (PNG)')
    return p


def export_parser(doc):
    p = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--run_dir', required=True, help="a stage's run directory: its latest checkpoint is exported")
    p.add_argument('--out', required=True, help='the SavedModel directory to write (new or empty)')
    return p


def localise(argv, doc=None):
    """localise.py: -> the answer (a dict); prints it, writes --json and --picture."""
    from geoloc.serve import answer as answer_lib
    from geoloc.serve import served
    args = localise_parser(doc).parse_args(argv)
    say = lambda msg: print(f'[localise] {msg}', flush=True)   # noqa: E731
    model = served.from_run(args.run_dir) if args.run_dir else served.from_saved_model(args.saved_model)
    served.check_stage(model.info, args.stage)
    answer, picture = answer_lib.localise(model, args.panorama, args.tiles, args.yaw, args.mpp, args.top_k,
                                          args.batch, progress=say)
    for line in answer_lib.lines(answer):
        print(line)
    if args.json:
        answer_lib.write_json(answer, args.json)
        say(f'answer written to {args.json}')
    if args.picture:
        answer_lib.draw(answer, picture, args.picture)
        say(f'picture written to {args.picture}')
    return answer


def export(argv, doc=None):
    """export.py: -> the SavedModel's metadata (a dict); prints what was written."""
    from geoloc.serve import served
    args = export_parser(doc).parse_args(argv)
    info = served.export(args.run_dir, args.out)
    print(f'[export] {info["stage"]} ({info["localise"]}{", covariance" if info["covariance"] else ""}) from '
          f'{args.run_dir} ({info["checkpoint"]}) -> SavedModel {args.out}')
    print(f'[export] inputs: {info["input"]}; panoramas {info["grd_size"][0]}x{info["grd_size"][1]}, tiles '
          f'{info["sat_size"]}; signatures serving_default, embed_panorama, embed_tile, metadata')
    return info


def main(command, argv=None, doc=None):
    """Run `command` (localise or export) -> exit status: 0, or 2 after one line `error: ...` on stderr."""
    import tensorflow as tf
    from geoloc import runlog
    try:
        command(sys.argv[1:] if argv is None else argv, doc)
        return 0
    except (*errors.ONE_LINE, OSError, tf.errors.OpError) as e:   # bad input, or the machine (a full disk ...)
        msg = runlog.one_line(e)
        if not msg:
            raise
        return _error(msg)


def _error(msg):
    print(f'error: {msg}', file=sys.stderr)
    return 2
