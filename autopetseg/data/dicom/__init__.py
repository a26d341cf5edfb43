"""DICOM in: ``autopetseg import-dicom`` turns a tree of DICOM files into cases of any accepted layout.

Modules, in the order an import runs them:

* ``catalog``   walk the tree, read every header once, group the files by study and series;
* ``selection`` per study, the PET series, the CT of the same frame of reference nearest in time,
                and any RTSTRUCT/SEG (several candidates: listed, the rule's choice or ``--series``);
* ``volume``    a series as a float32 volume (each slice with its own rescale) and its geometry,
                exactly where SimpleITK puts it;
* ``suv``       the SUV body-weight factor by the quantitative-imaging rules, with an audit record;
* ``masks``     RTSTRUCT contours and DICOM SEG segments as a lesion mask on the PET grid;
* ``importer``  the cases written in the autopet, nnunet or flat layout, plus ``<PET>.dicom.json``
                (``source``): the SUV audit and the PET series' files, which ``predict --dicom-seg``
                reads to reference the source series.

pydicom and highdicom are an extra (``pip install -e ".[dicom]"``): nothing outside this package and
``inference/dicom_seg.py`` imports them, and those import them only when a DICOM command runs.
"""

from __future__ import annotations

from autopetseg.errors import InputError

INSTALL_HINT = 'pip install -e ".[dicom]"'


def require_dicom_libraries(what: str) -> None:
    """``InputError`` naming the install line when pydicom or highdicom cannot be imported."""
    missing = []
    for module in ("pydicom", "highdicom"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise InputError(f"{what} needs {' and '.join(missing)}, which is not installed: {INSTALL_HINT}")
