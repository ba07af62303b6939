"""QM9 molecular graphs with PyTorch Geometric's node and edge features, from ``qm9pack``.

The Nash-MTL / FAMO / LibMTL QM9 tables train the Gilmer et al. MPNN on
``torch_geometric.datasets.QM9``; this module rebuilds the same inputs offline.

Node features (11, PyG's order, atoms in the order of the XYZ geometry)::

    [H, C, N, O, F] one-hot | atomic number | aromatic | sp, sp2, sp3 one-hot | number of H neighbours

Edge features: bond type one-hot ``[single, double, triple, aromatic]``. The published
runs wrap the dataset in ``Complete()`` + ``T.Distance(norm=False)``: every ordered pair
of distinct atoms is an edge, non-bonded pairs get a zero bond one-hot, and the
Euclidean distance in Angstrom is appended (5 edge features). :func:`pack_graphs`
stores what that needs (node features, the bond-type matrix, positions, the mask) in one
fixed-shape float32 array per molecule, so a batch is ``(B, 29, PACK_WIDTH)`` and a
jitted model compiles once.

Bond perception (RDKit, ``pip install 'imtl-jax[chem]'``, needed only to *build* the
cache): bonds and bond orders are perceived from the XYZ geometry with
``rdDetermineBonds.DetermineBonds(charge=0)`` (PyG's SDF was likewise converted from
the XYZ files by Open Babel); the molecule is then sanitized so that aromaticity and
hybridization are RDKit's. Each molecule's ``source`` says how its bonds were obtained:

* ``0`` -- from the geometry, and the molecule equals the SMILES of ``qm9pack`` (same
  canonical SMILES with explicit hydrogens and charges);
* ``1`` -- from the geometry, but it differs from the SMILES (bond orders or charges,
  or a different skeleton: ``skeleton_differs``); the geometry's bonds are kept;
* ``2`` -- geometry perception failed (e.g. a strained cage where covalent radii add a
  spurious bond); the SMILES graph (with hydrogens) was mapped onto the geometry's atoms
  by a subgraph match choosing the shortest total bond length;
* ``3`` -- both failed: the geometry's connectivity with single bonds, no aromaticity or
  hybridization.

Note on PyG itself: PyG reads its SDF with ``sanitize=False``, so with a recent RDKit
its processed hybridization flags are mostly unset and aromatic bonds absent
(pyg-team/pytorch_geometric#2163); its pre-processed download was built from sanitized
molecules. The features here follow the *definitions* (sanitized molecules).

Cache: the built graphs are one compressed ``.npz`` of ragged arrays (about 20 MB)
under the cache folder of :func:`experiments.data.resolve_cache_dir`; it holds the
targets and positions too, so it is all an accelerator machine needs
(``python -m experiments.data.qm9_graph export qm9_graphs.npz``, then
``--graph-file qm9_graphs.npz``; neither qm9pack nor RDKit is needed to load it).

Example::

    >>> from experiments.data import qm9_graph
    >>> qm9_graph.NODE_FEATURES[:5], len(qm9_graph.NODE_FEATURES)
    (('H', 'C', 'N', 'O', 'F'), 11)
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from experiments.data import DataUnavailableError, cache_key, resolve_cache_dir
from experiments.data.qm9 import (
    ATOMIC_NUMBERS,
    MAX_ATOMS,
    _fingerprint,
    _part_files,
    load_qm9_raw,
    qm9pack_data_dir,
)

__all__ = [
    "NODE_FEATURES",
    "BOND_TYPES",
    "SOURCES",
    "PACK_WIDTH",
    "RDKIT_INSTALL",
    "read_smiles",
    "perceive_molecule",
    "build_graphs",
    "load_qm9_graphs",
    "export_graphs",
    "node_features",
    "pack_graphs",
    "GraphDataset",
    "published_split",
]

NODE_FEATURES = ("H", "C", "N", "O", "F", "atomic_number", "aromatic", "sp", "sp2", "sp3", "num_hs")
BOND_TYPES = ("single", "double", "triple", "aromatic")
SOURCES = ("geometry==smiles", "geometry!=smiles", "smiles_on_geometry", "connectivity_only")
NUM_NODE = len(NODE_FEATURES)
# packed layout per atom: 11 node features | 3 coordinates | 29 bond codes (0 none, 1..4) | mask
PACK_WIDTH = NUM_NODE + 3 + MAX_ATOMS + 1
RDKIT_INSTALL = "pip install 'imtl-jax[chem]'  (or: pip install 'rdkit>=2023.9')"
_GRAPH_VERSION = 1
_SYMBOL = {v: k for k, v in ATOMIC_NUMBERS.items()}
_ELEMENT_COLUMN = {1: 0, 6: 1, 7: 2, 8: 3, 9: 4}


def read_smiles(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The ``SMILES`` column of qm9pack's CSVs, in the row order of :func:`~experiments.data.qm9.parse_qm9_csvs`."""
    data_dir = Path(data_dir) if data_dir is not None else qm9pack_data_dir()
    csv.field_size_limit(sys.maxsize)
    out: list[str] = []
    for part in _part_files(data_dir):
        with open(part, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            if "SMILES" not in header:
                raise ValueError(f"{part}: no SMILES column in the header")
            i = header.index("SMILES")
            out.extend(row[i] for row in reader if row)
    return out


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdDetermineBonds
    except ImportError as e:
        raise DataUnavailableError(f"building QM9 graphs needs RDKit: {RDKIT_INSTALL}") from e
    RDLogger.DisableLog("rdApp.*")
    return Chem, rdDetermineBonds


def _xyz_mol(Chem, z: np.ndarray, r: np.ndarray):
    lines = [f"{len(z)}", ""] + [f"{_SYMBOL[int(a)]} {x:.10f} {y:.10f} {w:.10f}" for a, (x, y, w) in zip(z, r)]
    return Chem.MolFromXYZBlock("\n".join(lines) + "\n")


def _skeleton(Chem, mol):
    """Copy of ``mol`` with every bond single, no charges or aromaticity (the bare graph)."""
    rw = Chem.RWMol(mol)
    for b in rw.GetBonds():
        b.SetBondType(Chem.BondType.SINGLE)
        b.SetIsAromatic(False)
    for a in rw.GetAtoms():
        a.SetFormalCharge(0)
        a.SetIsAromatic(False)
        a.SetNoImplicit(True)
        a.SetNumExplicitHs(0)
    m = rw.GetMol()
    m.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(m)
    return m


def _key(Chem, mol) -> str:
    return Chem.MolToSmiles(mol, isomericSmiles=False)


def _smiles_on_geometry(Chem, rdDetermineBonds, smiles_h, z, r):
    """The SMILES molecule (explicit H) renumbered onto the geometry's atoms, or None."""
    query = _skeleton(Chem, smiles_h)
    for factor in (1.3, 1.45):
        conn = _xyz_mol(Chem, z, r)
        try:
            rdDetermineBonds.DetermineConnectivity(conn, covFactor=factor)
        except Exception:
            continue
        target = _skeleton(Chem, conn)
        matches = target.GetSubstructMatches(query, uniquify=False, maxMatches=512, useChirality=False)
        if not matches:
            continue
        pairs = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in smiles_h.GetBonds()])
        best = min(matches, key=lambda m: float(np.linalg.norm(
            r[np.asarray(m)[pairs[:, 0]]] - r[np.asarray(m)[pairs[:, 1]]], axis=1).sum()))
        order = [0] * len(best)
        for q, t in enumerate(best):
            order[t] = q
        return Chem.RenumberAtoms(smiles_h, order)
    return None


def perceive_molecule(z: np.ndarray, r: np.ndarray, smiles: str):
    """Bonds and atom flags of one molecule (atoms in geometry order).

    Args:
      z: (n,) atomic numbers; r: (n, 3) Angstrom; smiles: qm9pack's SMILES of the molecule.

    Returns:
      ``(bonds, aromatic, hybrid, source, skeleton_differs)``: ``bonds`` (m, 3) int8 rows
      ``(i, j, type)`` with i < j and type 1..4 = single/double/triple/aromatic;
      ``aromatic`` (n,) int8; ``hybrid`` (n,) int8 (1 sp, 2 sp2, 3 sp3, 0 other); ``source``
      (see the module docstring) and whether the bare graph differs from the SMILES's.
    """
    Chem, rdDetermineBonds = _rdkit()
    z = np.asarray(z)
    r = np.asarray(r, dtype=np.float64)
    smi = Chem.MolFromSmiles(smiles)
    smiles_h = Chem.AddHs(smi) if smi is not None else None
    mol, source, skel_differs = None, 3, True
    geo = _xyz_mol(Chem, z, r)
    try:
        rdDetermineBonds.DetermineBonds(geo, charge=0)
        Chem.SanitizeMol(geo)
        mol = geo
    except Exception:
        mol = None
    if mol is not None:
        if smiles_h is not None and _key(Chem, mol) == _key(Chem, smiles_h):
            source, skel_differs = 0, False
        else:
            source = 1
            skel_differs = smiles_h is None or _key(Chem, _skeleton(Chem, mol)) != _key(Chem, _skeleton(Chem, smiles_h))
    elif smiles_h is not None and smiles_h.GetNumAtoms() == len(z):
        mapped = _smiles_on_geometry(Chem, rdDetermineBonds, smiles_h, z, r)
        if mapped is not None:
            mol, source, skel_differs = mapped, 2, False
    if mol is None:  # connectivity only
        mol = _xyz_mol(Chem, z, r)
        try:
            rdDetermineBonds.DetermineConnectivity(mol)
        except Exception:
            pass
        source, skel_differs = 3, True
        aromatic = np.zeros(len(z), np.int8)
        hybrid = np.zeros(len(z), np.int8)
        codes = {Chem.BondType.SINGLE: 1}
    else:
        aromatic = np.array([a.GetIsAromatic() for a in mol.GetAtoms()], np.int8)
        hyb = {Chem.HybridizationType.SP: 1, Chem.HybridizationType.SP2: 2, Chem.HybridizationType.SP3: 3}
        hybrid = np.array([hyb.get(a.GetHybridization(), 0) for a in mol.GetAtoms()], np.int8)
        codes = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3, Chem.BondType.AROMATIC: 4}
    if [a.GetAtomicNum() for a in mol.GetAtoms()] != [int(a) for a in z]:
        raise AssertionError("perceived molecule lost the geometry's atom order")
    rows = []
    for b in mol.GetBonds():
        i, j = sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))
        rows.append((i, j, codes.get(b.GetBondType(), 1)))
    bonds = np.array(sorted(rows), np.int8).reshape(-1, 3)
    return bonds, aromatic, hybrid, source, skel_differs


def build_graphs(raw: dict[str, np.ndarray], smiles: list[str], *, log_every: int = 0) -> dict[str, np.ndarray]:
    """Perceive every molecule of ``raw`` (:func:`~experiments.data.qm9.load_qm9_raw`).

    Returns ragged arrays: ``n_atoms`` (N,) int8, ``z`` (A,) int8, ``pos`` (A, 3) float32,
    ``aromatic``/``hybrid`` (A,) int8, ``n_bonds`` (N,) int16, ``bonds`` (M, 3) int8 (local
    atom indices, type 1..4), ``source`` (N,) int8, ``skeleton_differs`` (N,) bool,
    ``targets`` (N, 11) float64 and ``index`` (N,) int32 (QM9 ids), with A = sum of n_atoms.
    """
    n = len(raw["index"])
    if len(smiles) != n:
        raise ValueError(f"{len(smiles)} SMILES for {n} molecules")
    z_l, pos_l, aro_l, hyb_l, bond_l = [], [], [], [], []
    n_bonds = np.zeros(n, np.int16)
    source = np.zeros(n, np.int8)
    skel = np.zeros(n, bool)
    t0 = time.time()
    for k in range(n):
        na = int(raw["n_atoms"][k])
        z, r = raw["Z"][k, :na], raw["R"][k, :na]
        bonds, aro, hyb, src, sd = perceive_molecule(z, r, smiles[k])
        z_l.append(z.astype(np.int8))
        pos_l.append(r.astype(np.float32))
        aro_l.append(aro)
        hyb_l.append(hyb)
        bond_l.append(bonds)
        n_bonds[k] = len(bonds)
        source[k], skel[k] = src, sd
        if log_every and (k + 1) % log_every == 0:
            print(f"qm9_graph: {k + 1}/{n} molecules, {time.time() - t0:.0f} s", flush=True)
    return {
        "version": np.array(_GRAPH_VERSION),
        "n_atoms": raw["n_atoms"].astype(np.int8),
        "z": np.concatenate(z_l),
        "pos": np.concatenate(pos_l),
        "aromatic": np.concatenate(aro_l),
        "hybrid": np.concatenate(hyb_l),
        "n_bonds": n_bonds,
        "bonds": np.concatenate(bond_l).astype(np.int8),
        "source": source,
        "skeleton_differs": skel,
        "targets": raw["targets"].astype(np.float64),
        "index": raw["index"].astype(np.int32),
    }


def _check(g: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    need = ("n_atoms", "z", "pos", "aromatic", "hybrid", "n_bonds", "bonds", "source", "targets", "index")
    missing = [k for k in need if k not in g]
    if missing:
        raise ValueError(f"{what}: not a QM9 graph file (missing {missing}); build one with: "
                         "python -m experiments.data.qm9_graph export PATH")
    if (int(g["n_atoms"].astype(np.int64).sum()) != len(g["z"])
            or int(g["n_bonds"].astype(np.int64).sum()) != len(g["bonds"])):
        raise ValueError(f"{what}: ragged array lengths disagree with n_atoms / n_bonds (corrupt file); rebuild it")
    return g


def _default_path(data_dir: Path, cache_dir) -> Path:
    key = cache_key("qm9-graph", {"v": _GRAPH_VERSION, "dir": str(data_dir.resolve()), "files": _fingerprint(data_dir)})
    return resolve_cache_dir(cache_dir) / f"{key}.npz"


def load_qm9_graphs(
    *,
    graph_file: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    log_every: int = 0,
) -> dict[str, np.ndarray]:
    """The ragged graph arrays of :func:`build_graphs`: from ``graph_file`` if given
    (no qm9pack or RDKit needed), else from the cache, else built from ``data_dir``
    (default: qm9pack's) and cached (compressed ``.npz``, written atomically)."""
    if graph_file is not None:
        p = Path(graph_file).expanduser()
        if not p.is_file():
            raise DataUnavailableError(f"--graph-file {p} does not exist; create it with: "
                                       f"python -m experiments.data.qm9_graph export {p}")
        with np.load(p, allow_pickle=False) as f:
            return _check({k: f[k] for k in f.files}, str(p))
    data_dir = Path(data_dir) if data_dir is not None else qm9pack_data_dir()
    path = _default_path(data_dir, cache_dir)
    if use_cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                return _check({k: f[k] for k in f.files}, str(path))
        except Exception:
            pass  # corrupt: rebuild
    raw = load_qm9_raw(data_dir, cache_dir, use_cache)
    g = build_graphs(raw, read_smiles(data_dir), log_every=log_every)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, **g)
            os.replace(tmp, path)
        except OSError:
            pass
    return g


def export_graphs(dest: str | os.PathLike, **kwargs) -> Path:
    """Write the graph cache (built if needed) to ``dest``, a self-contained file for another machine."""
    g = load_qm9_graphs(**kwargs)
    dest = Path(dest).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = None if kwargs.get("graph_file") else _default_path(Path(kwargs.get("data_dir") or qm9pack_data_dir()),
                                                              kwargs.get("cache_dir"))
    if src is not None and src.is_file():
        shutil.copyfile(src, dest)
    else:
        np.savez_compressed(dest, **g)
    return dest


# ------------------------------------------------------------------------ dense padded form


def node_features(g: dict[str, np.ndarray]) -> np.ndarray:
    """PyG's 11 node features (A, 11) int8 for the ragged atoms of ``g`` (order: :data:`NODE_FEATURES`)."""
    z = g["z"].astype(np.int64)
    x = np.zeros((len(z), NUM_NODE), np.int8)
    for zz, col in _ELEMENT_COLUMN.items():
        x[z == zz, col] = 1
    x[:, 5] = z
    x[:, 6] = g["aromatic"]
    for h in (1, 2, 3):
        x[:, 6 + h] = g["hybrid"] == h
    # number of hydrogen neighbours, from the bond list (as PyG counts it from edge_index)
    starts = np.repeat(np.cumsum(g["n_atoms"].astype(np.int64)) - g["n_atoms"], g["n_bonds"].astype(np.int64))
    b = g["bonds"].astype(np.int64)
    i, j = starts + b[:, 0], starts + b[:, 1]
    nh = np.zeros(len(z), np.int64)
    np.add.at(nh, i, z[j] == 1)
    np.add.at(nh, j, z[i] == 1)
    x[:, 10] = nh
    return x


def pack_graphs(g: dict[str, np.ndarray], rows: np.ndarray | None = None) -> np.ndarray:
    """Molecules ``rows`` (default: all) as one fixed-shape float32 array (N, 29, :data:`PACK_WIDTH`).

    Per atom slot: ``[:11]`` node features, ``[11:14]`` position (Angstrom), ``[14:43]``
    bond code to each atom slot (0 none, 1..4 single/double/triple/aromatic), ``[43]`` mask
    (1 for a real atom). Padding slots are all zero.
    """
    n_atoms = g["n_atoms"].astype(np.int64)
    starts = np.cumsum(n_atoms) - n_atoms
    bstarts = np.cumsum(g["n_bonds"].astype(np.int64)) - g["n_bonds"]
    rows = np.arange(len(n_atoms)) if rows is None else np.asarray(rows, np.int64)
    x_all = g.get("_x")
    if x_all is None:
        x_all = node_features(g)
    out = np.zeros((len(rows), MAX_ATOMS, PACK_WIDTH), np.float32)
    na = n_atoms[rows]
    mol = np.repeat(np.arange(len(rows)), na)
    slot = np.arange(int(na.sum())) - np.repeat(np.cumsum(na) - na, na)
    atom = np.repeat(starts[rows], na) + slot
    out[mol, slot, :NUM_NODE] = x_all[atom]
    out[mol, slot, NUM_NODE:NUM_NODE + 3] = g["pos"][atom]
    out[mol, slot, -1] = 1.0
    nb = g["n_bonds"].astype(np.int64)[rows]
    bmol = np.repeat(np.arange(len(rows)), nb)
    bidx = np.repeat(bstarts[rows], nb) + (np.arange(int(nb.sum())) - np.repeat(np.cumsum(nb) - nb, nb))
    b = g["bonds"][bidx].astype(np.int64)
    off = NUM_NODE + 3
    out[bmol, b[:, 0], off + b[:, 1]] = b[:, 2]
    out[bmol, b[:, 1], off + b[:, 0]] = b[:, 2]
    return out


class GraphDataset:
    """Molecules ``rows`` of ``g`` with standardized targets: items ``{"graph": (29, PACK_WIDTH), "y": (11,)}``.

    The molecules are packed once at construction (small integers as int8, positions as
    float32: about 1.5 kB per molecule), so ``get_batch(indices)`` -- the batch iterator's fast
    path -- is a gather and a cast, cheap next to an accelerator step.
    """

    def __init__(self, g: dict[str, np.ndarray], rows: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray,
                 chunk: int = 8192):
        if "_x" not in g:
            g = dict(g, _x=node_features(g))
        self.rows = np.asarray(rows, np.int64)
        self.y = ((g["targets"][self.rows] - target_mean) / target_std).astype(np.float32)
        n = len(self.rows)
        self._ints = np.zeros((n, MAX_ATOMS, PACK_WIDTH - 3), np.int8)  # features | bond codes | mask
        self._pos = np.zeros((n, MAX_ATOMS, 3), np.float32)
        for s in range(0, n, chunk):
            p = pack_graphs(g, self.rows[s:s + chunk])
            self._ints[s:s + chunk, :, :NUM_NODE] = p[..., :NUM_NODE]
            self._ints[s:s + chunk, :, NUM_NODE:] = p[..., NUM_NODE + 3:]
            self._pos[s:s + chunk] = p[..., NUM_NODE:NUM_NODE + 3]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} molecules")
        b = self.get_batch(np.array([i]))
        return {k: v[0] for k, v in b.items()}

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        ints = self._ints[indices]
        out = np.empty((len(indices), MAX_ATOMS, PACK_WIDTH), np.float32)
        out[..., :NUM_NODE] = ints[..., :NUM_NODE]
        out[..., NUM_NODE:NUM_NODE + 3] = self._pos[indices]
        out[..., NUM_NODE + 3:] = ints[..., NUM_NODE:]
        return {"graph": out, "y": self.y[indices]}


def published_split(n: int) -> dict[str, np.ndarray]:
    """The fixed split of the published protocol, row indices per split (same for every seed).

    For the full data set (130,831 molecules) this is
    :func:`experiments.data.qm9.protocol_split` -- 110,831 / 10,000 / 10,000, checked against
    its stored SHA-256; for a smaller set (fixtures) the same generator with 10 % validation
    and 10 % test (at least one molecule each).
    """
    from experiments.data.qm9 import PROTOCOL_SIZES, protocol_split

    if n == sum(PROTOCOL_SIZES):
        return protocol_split(n)
    if n < 3:
        raise ValueError(f"need at least 3 molecules for a train/val/test split, got {n}")
    k = max(1, n // 10)
    return protocol_split(n, (n - 2 * k, k, k))


def _summary(g: dict[str, np.ndarray]) -> str:
    src = np.bincount(g["source"], minlength=4)
    lines = [f"{len(g['n_atoms'])} molecules, {len(g['z'])} atoms, {len(g['bonds'])} bonds"]
    lines += [f"  source {i} ({SOURCES[i]}): {int(c)}" for i, c in enumerate(src)]
    lines.append(f"  bond perception differs from the SMILES: {int(src[1] + src[2] + src[3])} "
                 f"(skeleton differs: {int(g['skeleton_differs'].sum())})")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m experiments.data.qm9_graph [build | export PATH] [--graph-file F]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m experiments.data.qm9_graph",
                                description="Build, summarize or export the QM9 graph cache.")
    p.add_argument("action", choices=["build", "export"],
                   help="build: build/load the cache and print counts; export: also copy it to PATH")
    p.add_argument("path", nargs="?", help="export destination (a .npz file)")
    p.add_argument("--graph-file", default=None,
                   help="read this graph file instead of building (default: build from qm9pack)")
    p.add_argument("--data-dir", default=None, help="folder of qm9pack-format CSVs (default: the installed qm9pack's)")
    a = p.parse_args(argv)
    kw = dict(graph_file=a.graph_file, data_dir=a.data_dir)
    t0 = time.time()
    if a.action == "export":
        if not a.path:
            p.error("export needs a destination PATH")
        dest = export_graphs(a.path, **kw, log_every=10_000)
        g = load_qm9_graphs(graph_file=dest)
        print(f"wrote {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    else:
        g = load_qm9_graphs(**kw, log_every=10_000)
    print(_summary(g))
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
