// Registration hooks: one per native component, defined in its own .cpp file.
#pragma once
#include <pybind11/pybind11.h>

namespace leafe {
void register_packer(pybind11::module_& m);
}  // namespace leafe
