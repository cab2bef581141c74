// leafe_fast._C: the native half of leafe-fast. Each component registers its bindings here.
#include <pybind11/pybind11.h>

#include "bindings.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "leafe-fast native extension (C++17): tree-trajectory packer and helpers";
  m.def("abi_version", []() { return 1; }, "Version of the _C binary interface; bumped when a binding changes.");
  leafe::register_packer(m);
}
