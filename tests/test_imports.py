"""The house's rules, read from the source with `ast` (nothing is imported): dependencies run one way, the
top level holds only the card's files and the few a researcher edits, errors have one home, modules stay short.
docs/layout.md describes the same house."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What is run, never imported by the library: the stage scripts, the command line, the main job, the study, the
# commands that use a trained model.
ENTRY = {'train_first_E_1', 'train_second_E_2_1', 'train_second_E_2_2', 'train_third_E_3', 'geoloc.cli', 'run_all',
         'experiments.study.study', 'localise', 'export'}
MAX_TOP_LEVEL = 14
MAX_LINES = 400
LONG_ALLOWED = {'tools.synthetic_data'}   # the generator: one renderer per dial, read as one piece


def modules():
    """{dotted name: path} of every project module outside tests/ and benchmarks/."""
    out = {}
    for path in glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, '*', '**', '*.py'),
                                                                  recursive=True):
        rel = os.path.relpath(path, ROOT)
        if rel.split(os.sep)[0] in ('tests', 'benchmarks', '.venv', 'runs', 'data'):
            continue
        name = rel[:-3].replace(os.sep, '.')
        out[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
    return out


MODULES = modules()
LIBRARY = {m for m in MODULES if m not in ENTRY and not m.startswith(('tools', 'experiments'))}


def imports(path):
    """The project modules a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f'{node.module}.{a.name}' for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition('.')[0]
            if name and name != 'geoloc' and not (isinstance(node, ast.ImportFrom) and name == node.module
                                                 and f'{node.module}.{node.names[0].name}' in MODULES):
                found.add(name)
    return found


GRAPH = {m: imports(p) - {m} for m, p in MODULES.items()}


def test_the_graph_is_read():
    assert {'geoloc.train.loop', 'geoloc.eval.testing', 'model', 'stages', 'geoloc.cli'} <= set(MODULES)
    assert 'geoloc.data.pipeline' in GRAPH['geoloc.train.loop'] and 'model' in GRAPH['stages']


def test_no_import_cycles():
    state, stack = {}, []

    def visit(m):
        state[m] = 'open'
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 'open':
                raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 'done'
    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_library_imports_no_entry_script_and_no_tool():
    bad = {m: sorted(n for n in GRAPH[m] if n in ENTRY or n.startswith(('tools', 'experiments'))) for m in LIBRARY}
    assert not {m: v for m, v in bad.items() if v}


def test_error_classes_have_one_home():
    homes = {}
    for m in LIBRARY | {'geoloc.cli'}:
        for node in ast.walk(ast.parse(open(MODULES[m]).read())):
            if isinstance(node, ast.ClassDef) and any(getattr(b, 'id', getattr(b, 'attr', '')).endswith(
                    ('Error', 'Exception')) for b in node.bases):
                homes.setdefault(node.name, []).append(m)
    assert homes and {m for ms in homes.values() for m in ms} == {'geoloc.errors'}, homes


def test_top_level_and_module_length():
    top = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, '*.py')))
    assert len(top) <= MAX_TOP_LEVEL, top
    long = {m: n for m, p in MODULES.items() if (n := len(open(p).read().splitlines())) > MAX_LINES}
    assert set(long) <= LONG_ALLOWED, long
