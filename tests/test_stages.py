"""stages.py: the registry the scripts, run_all.py and the benchmarks read, and what a Stage derives."""
import os

import config
import stages


def cfg(**kw):
    return config.resolve('x', kw)


def test_registry_is_a_chain_of_scripts_that_define_their_stages():
    """Properties, not the list: every registered stage is defined by its script under its own name, its
    predecessor is registered and comes before it, and main_scripts() runs each script once, in order."""
    for i, name in enumerate(stages.ORDER):
        stage = stages.get(name)
        assert stage.name == name and stages.SCRIPTS[name] == (stage.script or stages.SCRIPTS[name])
        for before in stage.accepts:
            assert before in stages.ORDER[:i], f'{name} starts from {before}, which is not trained before it'
    assert set(stages.SCRIPTS) == set(stages.ORDER) and not stages.get(stages.ORDER[0]).previous
    flat = [(script, name) for script, names in stages.main_scripts() for name in names]
    assert [name for _, name in flat] == list(stages.ORDER)
    assert all(stages.SCRIPTS[name] == script for script, name in flat)
    scripts = [script for script, _ in stages.main_scripts()]
    assert len(scripts) == len(set(scripts))                      # a script's stages run in one command


def test_derived_properties():
    e1a, e1, e21, e22, e3 = (stages.get(n) for n in stages.ORDER)
    assert [s.localise for s in (e1a, e1, e21, e22, e3)] == ['', 'offset', 'heatmap', 'heatmap', 'heatmap']
    assert e21.accepts == ('E_1a', 'E_1') and e22.accepts == ('E_2_1',)
    assert e22.previous_command() == 'python train_second_E_2_1.py' and e1.command == 'python train_first_E_1.py'
    assert e1.carry == 'all' and e22.carry == 'slots' and not e1a.uses_semi


def test_run_directories():
    e1a, e1, e21 = stages.get('E_1a'), stages.get('E_1'), stages.get('E_2_1')
    assert e1a.run_dirs(cfg()) == (os.path.join('runs', 'E_1', 'phase_a'), '')
    # phase b lives beside phase a, under the script's --run_dir
    assert e1.run_dirs(cfg(run_dir='R')) == ('R', os.path.join('R', 'phase_a'))
    assert e1.run_dirs(cfg()) == (os.path.join('runs', 'E_1'), os.path.join('runs', 'E_1', 'phase_a'))
    # E_2_1 starts from the end of phase a by default, as the released script does
    assert e21.run_dirs(cfg()) == (os.path.join('runs', 'E_2_1'), os.path.join('runs', 'E_1', 'phase_a'))
    assert e21.run_dirs(cfg(init_from='runs/E_1')) == (os.path.join('runs', 'E_2_1'), 'runs/E_1')
