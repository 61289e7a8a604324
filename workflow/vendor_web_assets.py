"""Vendor the web assets that make the HTML reports readable offline, from the npm registry, pinned and verified.

Two consumers, both offline by construction (hospital networks often have no internet access):

- the great-expectations Data Docs (``reports/validation/``): GE 1.x pages load Bootstrap, jQuery, popper.js,
  bootstrap-table, bootstrap-datepicker, bootstrap-dark and Font Awesome from CDNs, and the GE package ships none of
  them (its ``render/view/static`` holds only its own CSS, fonts and images). The files go to
  ``spinedxa/templates/web/`` with ``assets.json`` (CDN URL -> local file, sha256, package, licence), and
  ``spinedxa.validate`` copies them into each Data Docs site and points the pages at them.
- ``dvc plots show`` / ``dvc plots diff``: DVC's page loads Vega, Vega-Lite and vega-embed from a CDN. Those three
  are inlined into ``workflow/plots/offline.html``, an ``--html-template`` without DVC's scripts placeholder (so
  DVC adds no CDN tags), with their licences under ``workflow/plots/LICENSES/``.

Run this only to change a version (``make vendor``; needs ``npm``, reaches only the npm registry). Each tarball is
checked against the sha512 integrity pinned below before anything is written. The pipeline and the tests never run it.

Usage::

    python workflow/vendor_web_assets.py
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "spinedxa" / "templates" / "web"
PLOTS = ROOT / "workflow" / "plots"
TEMPLATE = PLOTS / "offline.html"

# The MIT licence text (SPDX "MIT"), for packages whose npm tarball ships none; {holder} from the package itself.
MIT = """MIT License

{holder}

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


@dataclass(frozen=True)
class Package:
    """One npm package: what to take from its tarball and, for the Data Docs, which CDN URLs it replaces."""

    name: str
    version: str
    integrity: str  # the registry's sha512 of the tarball (`npm view NAME@VERSION dist.integrity`)
    license: str  # SPDX identifier from its package.json
    files: dict[str, str]  # path in the tarball (under package/) -> destination (under WEB, or a plots script name)
    licence_file: str | None = "LICENSE"  # in the tarball; None: written from MIT with `holder`
    holder: str = ""
    urls: dict[str, str] = field(default_factory=dict)  # CDN URL in GE's pages -> destination under WEB
    plots: bool = False  # inlined into the DVC plots template instead of copied to WEB


# GE 1.24's templates (render/view/templates/{page,page_minimal,index_page,js_script_imports}.j2) name these
# versions; the same versions are vendored so the pages look as their authors made them.
DATADOCS = [
    Package("bootstrap", "4.3.1",
            "sha512-rXqOmH1VilAt2DyPzluTi2blhk17bO7ef+zLLPlWvG494pDxcM234pJ8wTc/6R40UWizAIIMgxjvxZg5kmsbag==", "MIT",
            {"dist/css/bootstrap.min.css": "bootstrap/bootstrap.min.css",
             "dist/js/bootstrap.min.js": "bootstrap/bootstrap.min.js"},
            urls={"https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap/bootstrap.min.css",
                  "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap/bootstrap.min.js"}),
    Package("@forevolve/bootstrap-dark", "1.1.0",
            "sha512-A3ucpEpxPoTVO490lZZCfjPXxv832l7mm1IxX3bXyxvgwnPGXDLyh7dWrphXKO8YBAu3EswbBEu3VSW8NRMW3A==", "MIT",
            # The minified build of the file GE names (153 KB instead of 883 KB, same rules).
            {"dist/css/bootstrap-prefers-dark.min.css": "bootstrap-dark/bootstrap-prefers-dark.min.css"},
            urls={"https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
                  "bootstrap-dark/bootstrap-prefers-dark.min.css"}),
    Package("jquery", "3.7.1",
            "sha512-m4avr8yL8kmFN8psrbFFFmB/If14iN5o9nw/NgnnM+kybDJpRsAynV2BsfpTYrTRysYUdADVD7CkUUizgkpLfg==", "MIT",
            {"dist/jquery.min.js": "jquery/jquery.min.js"}, licence_file="LICENSE.txt",
            urls={"https://code.jquery.com/jquery-3.7.1.min.js": "jquery/jquery.min.js"}),
    Package("popper.js", "1.12.9",
            "sha512-s0EEi9xiSCdqz9lV4IiVH5yIZnDX/U1t0tCjB+0jXx9jW8lrR7kOpVupiUg175ogqVoudpDXHF1p6dKATCHMeg==", "MIT",
            {"dist/umd/popper.min.js": "popper.js/popper.min.js"}, licence_file=None,
            holder="Copyright (C) Federico Zivolo 2017",  # the header of popper.min.js
            urls={"https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.js/popper.min.js"}),
    Package("bootstrap-table", "1.19.1",
            "sha512-WvV+l1AI/C+zThaKmfHmi/IuayVNB0qdFyEhFx1jyZhO0oLtNJNANkCR3rvJf6Dkh72dsLElxpE/bzK9seEQLA==", "MIT",
            {"dist/bootstrap-table.min.css": "bootstrap-table/bootstrap-table.min.css",
             "dist/bootstrap-table.min.js": "bootstrap-table/bootstrap-table.min.js",
             "dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
                 "bootstrap-table/bootstrap-table-filter-control.min.css",
             "dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
                 "bootstrap-table/bootstrap-table-filter-control.min.js"},
            urls={"https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css":
                  "bootstrap-table/bootstrap-table.min.css",
                  "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js":
                  "bootstrap-table/bootstrap-table.min.js",
                  # GE names 1.19.0 for the filter-control CSS (a 429-byte file) and 1.19.1 for everything else.
                  "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/"
                  "bootstrap-table-filter-control.min.css": "bootstrap-table/bootstrap-table-filter-control.min.css",
                  "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/"
                  "bootstrap-table-filter-control.css": "bootstrap-table/bootstrap-table-filter-control.min.css",
                  "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/"
                  "bootstrap-table-filter-control.min.js": "bootstrap-table/bootstrap-table-filter-control.min.js"}),
    Package("bootstrap-datepicker", "1.9.0",
            "sha512-9rYYbaVOheGYxjOr/+bJCmRPihfy+LkLSg4fIFMT9Od8WwWB/MB50w0JO1eBgKUMbb7PFHQD5uAfI3ArAxZRXA==",
            "Apache-2.0",
            {"dist/css/bootstrap-datepicker.min.css": "bootstrap-datepicker/bootstrap-datepicker.min.css",
             "dist/js/bootstrap-datepicker.min.js": "bootstrap-datepicker/bootstrap-datepicker.min.js"},
            urls={"https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
                  "bootstrap-datepicker/bootstrap-datepicker.min.css",
                  "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
                  "bootstrap-datepicker/bootstrap-datepicker.min.js"}),
    Package("@fortawesome/fontawesome-free", "6.6.0",
            "sha512-60G28ke/sXdtS9KZCpZSHHkCbdsOGEhIUGlwq6yhY74UpTiToIh8np7A8yphhM4BWsvNFtIvLpi4co+h9Mr9Ow==",
            "CC-BY-4.0 AND OFL-1.1 AND MIT",
            # all.min.css lists each font as woff2 first, then ttf; every current browser takes the woff2, so the
            # ttf copies (710 KB) are left out.
            {"css/all.min.css": "fontawesome/css/all.min.css",
             **{f"webfonts/{f}.woff2": f"fontawesome/webfonts/{f}.woff2"
                for f in ("fa-brands-400", "fa-regular-400", "fa-solid-900", "fa-v4compatibility")}},
            licence_file="LICENSE.txt",
            urls={"https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
                  "fontawesome/css/all.min.css"}),
]
# Latest releases of the majors DVC's page names (dvc_render.vega: vega@5, vega-lite@5, vega-embed@6).
PLOTS_PACKAGES = [
    Package("vega", "5.33.1",
            "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
            "BSD-3-Clause", {"build/vega.min.js": "vega"}, licence_file=None, plots=True),
    Package("vega-lite", "5.23.0",
            "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
            "BSD-3-Clause", {"build/vega-lite.min.js": "vega-lite"}, plots=True),
    Package("vega-embed", "6.29.0",
            "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
            "BSD-3-Clause", {"build/vega-embed.min.js": "vega-embed"}, plots=True),
]

TEMPLATE_HEAD = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Offline template for `dvc plots show/diff --html-template` (spinedxa: workflow/vendor_web_assets.py).
         There is deliberately no placeholder for DVC's scripts: DVC would fill it with CDN script tags.
{versions}
         Licences: workflow/plots/LICENSES/. -->
"""
TEMPLATE_TAIL = """    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def npm_pack(pkg: Package, dest: Path) -> Path:
    """Download ``pkg``'s tarball with ``npm pack`` and check it against the pinned sha512 integrity."""
    out = subprocess.run(["npm", "pack", f"{pkg.name}@{pkg.version}", "--pack-destination", str(dest), "--json"],
                         check=True, capture_output=True, text=True).stdout
    tarball = dest / json.loads(out)[0]["filename"]
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if digest != pkg.integrity:
        raise RuntimeError(f"{pkg.name}@{pkg.version}: tarball integrity {digest} != pinned {pkg.integrity}")
    return tarball


def member(tarball: Path, path: str) -> bytes:
    with tarfile.open(tarball) as tar:
        handle = tar.extractfile(f"package/{path}")
        if handle is None:
            raise FileNotFoundError(f"{tarball.name}: no file package/{path}")
        return handle.read()


def licence_text(pkg: Package, tarball: Path, bsd_template: str) -> str:
    if pkg.licence_file:
        return member(tarball, pkg.licence_file).decode("utf-8")
    if pkg.license == "MIT":
        return MIT.format(holder=pkg.holder)
    # vega's npm package ships no licence file; its package.json says BSD-3-Clause and its repository's LICENSE
    # names Trifacta Inc. (2013). The clauses are the standard BSD-3-Clause text, as in vega-lite's LICENSE.
    return bsd_template.replace(bsd_template.splitlines()[0], "Copyright (c) 2013, Trifacta Inc.", 1)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tarballs = {pkg.name: npm_pack(pkg, Path(tmp)) for pkg in DATADOCS + PLOTS_PACKAGES}
        bsd = member(tarballs["vega-lite"], "LICENSE").decode("utf-8")
        manifest: dict = {"packages": [], "files": {}, "urls": {}}
        for pkg in DATADOCS:
            folder = next(iter(pkg.files.values())).split("/")[0]
            for src, dst in pkg.files.items():
                data = member(tarballs[pkg.name], src)
                (WEB / dst).parent.mkdir(parents=True, exist_ok=True)
                (WEB / dst).write_bytes(data)
                manifest["files"][dst] = {"package": pkg.name, "sha256": hashlib.sha256(data).hexdigest()}
            licence = f"{folder}/LICENSE"
            (WEB / licence).write_text(licence_text(pkg, tarballs[pkg.name], bsd), encoding="utf-8")
            manifest["packages"].append({"name": pkg.name, "version": pkg.version, "integrity": pkg.integrity,
                                         "license": pkg.license, "licence_file": licence})
            manifest["urls"].update(pkg.urls)
        (WEB / "assets.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")

        (PLOTS / "LICENSES").mkdir(parents=True, exist_ok=True)
        versions, scripts = [], []
        for pkg in PLOTS_PACKAGES:
            (src, name), = pkg.files.items()
            code = member(tarballs[pkg.name], src).decode("utf-8")
            code = code.split("\n//# sourceMappingURL=")[0]  # the .map files are not shipped
            if "</script" in code.lower() or any(f"{{{p}}}" in code for p in ("scripts", "plot_divs", "refresh_tag")):
                raise RuntimeError(f"{pkg.name}: cannot be inlined (contains </script> or a DVC placeholder)")
            scripts.append(f'    <script data-package="{pkg.name}@{pkg.version}">{code}</script>\n')
            versions.append(f"         {pkg.name} {pkg.version} ({pkg.license}, npm {pkg.integrity[:23]}...)")
            (PLOTS / "LICENSES" / f"{pkg.name}.txt").write_text(licence_text(pkg, tarballs[pkg.name], bsd),
                                                                 encoding="utf-8")
        TEMPLATE.write_text(TEMPLATE_HEAD.format(refresh_tag="{refresh_tag}", versions="\n".join(versions))
                            + "".join(scripts) + TEMPLATE_TAIL.format(plot_divs="{plot_divs}"), encoding="utf-8")
    print(f"wrote {len(manifest['files'])} files to {WEB.relative_to(ROOT)} and {TEMPLATE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
