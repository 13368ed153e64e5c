"""The package's import graph: no circles, and no module reaching up a layer.

Reads every module of ``spactor_jax`` and ``tasks`` as text (``ast``; imports
inside functions, which run late, do not count) and checks that the
module-level imports form no circle, that ``spactor_jax/data`` and ``tasks``
import nothing of ``spactor_jax.objectives``, and that the helpers the
objectives are built on (``generator``, ``cwt``, ``network``, ``layers``,
``basics``) import nothing of it either.
"""

import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('spactor_jax', 'tasks')
BELOW_OBJECTIVES = ('spactor_jax.data', 'tasks', 'spactor_jax.generator', 'spactor_jax.cwt',
                    'spactor_jax.network', 'spactor_jax.layers', 'spactor_jax.basics',
                    'spactor_jax.model_families')


def _module_name(path):
  name = os.path.relpath(path, REPO)[:-len('.py')].replace(os.sep, '.')
  return name[:-len('.__init__')] if name.endswith('.__init__') else name


def _imports(path, modules):
  """The package modules ``path`` imports at module level (``TYPE_CHECKING`` blocks too)."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  found = set()
  nodes = list(tree.body)
  while nodes:
    node = nodes.pop()
    if isinstance(node, ast.If):
      nodes.extend(node.body + node.orelse)
    elif isinstance(node, ast.Try):
      nodes.extend(node.body + node.orelse + node.finalbody)
    elif isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:  # ``from package import module`` imports the module
        submodule = f'{node.module}.{alias.name}'
        found.add(submodule if submodule in modules else node.module)
  return {name for name in found if name in modules}


def _graph():
  paths = [path for package in PACKAGES
           for path in glob.glob(os.path.join(REPO, package, '**', '*.py'), recursive=True)]
  modules = {_module_name(path): path for path in paths}
  return {name: _imports(path, modules) for name, path in modules.items()}


def _circles(graph):
  """Every strongly connected set of more than one module (Tarjan)."""
  index, low, stack, on_stack, circles = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for child in graph[node]:
      if child not in index:
        visit(child)
        low[node] = min(low[node], low[child])
      elif child in on_stack:
        low[node] = min(low[node], index[child])
    if low[node] == index[node]:
      members = set()
      while True:
        member = stack.pop()
        on_stack.discard(member)
        members.add(member)
        if member == node:
          break
      if len(members) > 1:
        circles.append(sorted(members))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return circles


def test_imports_form_no_circle():
  assert _circles(_graph()) == []


def test_lower_layers_do_not_import_the_objectives():
  reaching_up = {name: sorted(i for i in imports if i.startswith('spactor_jax.objectives'))
                 for name, imports in _graph().items() if name.startswith(BELOW_OBJECTIVES)}
  assert {name: up for name, up in reaching_up.items() if up} == {}
