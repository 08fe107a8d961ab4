"""stages.py: the registry the scripts, run_all.py and the benchmarks read, and what a Stage derives."""
import os

import config
import stages


def cfg(**kw):
    return config.resolve('x', kw)


def test_registry_order_and_scripts():
    assert stages.ORDER == ('E_1a', 'E_1', 'E_2_1', 'E_2_2', 'E_3')
    assert stages.main_scripts() == [('train_first_E_1.py', ['E_1a', 'E_1']), ('train_second_E_2_1.py', ['E_2_1']),
                                     ('train_second_E_2_2.py', ['E_2_2']), ('train_third_E_3.py', ['E_3'])]
    for name in stages.ORDER:
        assert stages.get(name).name == name


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
