"""mkdocs hook: the notebooks of ``notebooks/`` become the site's tutorial pages.

The notebooks stay where the tests execute them; the site reads them in place, at the
same path (``notebooks/NAME.ipynb``), and mkdocs-jupyter renders them (executing them
when ``PYRO_CWM_DOCS_EXECUTE=true``).
"""

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]


@event_priority(100)  # before mkdocs-jupyter's on_files, which claims the .ipynb pages
def on_files(files: Files, config) -> Files:
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        src_uri = path.relative_to(REPO).as_posix()
        files.append(File(src_uri, str(REPO), config.site_dir, config.use_directory_urls))
    return files
