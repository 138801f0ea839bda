"""readout.TOWERS is every readout/tower_*.py file, matched in ORDER: a new tower is one new file."""
from pathlib import Path

import siglip_dola.readout as readout_package


def test_every_tower_file_is_in_the_table_in_order():
    files = {path.stem.removeprefix("tower_") for path in Path(readout_package.__file__).parent.glob("tower_*.py")}
    assert set(readout_package.TOWERS) == files
    orders = [module.ORDER for module in readout_package.TOWERS.values()]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)   # one place each, no tie to break
    names = list(readout_package.TOWERS)
    assert names.index("hf_siglip2") < names.index("hf")   # hf's build also accepts NaFlex vision models
    for module in readout_package.TOWERS.values():
        assert callable(module.build) and module.FORMS in readout_package.SUPPORTED
    assert set(readout_package.TRUNKS) == {name for name, m in readout_package.TOWERS.items() if hasattr(m, "trunk")}
