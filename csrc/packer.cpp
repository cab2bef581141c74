// Tree-trajectory packer. (The packing algorithms land with the packer issue.)
#include <cstdint>

#include <pybind11/numpy.h>

#include "bindings.h"

namespace py = pybind11;

namespace leafe {

// Exclusive prefix sum of sample lengths: the offsets of samples in a concatenated buffer.
static py::array_t<int64_t> lengths_to_offsets(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths) {
  auto in = lengths.unchecked<1>();
  py::array_t<int64_t> out(in.shape(0) + 1);
  auto o = out.mutable_unchecked<1>();
  int64_t acc = 0;
  o(0) = 0;
  for (py::ssize_t i = 0; i < in.shape(0); ++i) {
    acc += in(i);
    o(i + 1) = acc;
  }
  return out;
}

void register_packer(py::module_& m) {
  m.def("lengths_to_offsets", &lengths_to_offsets, py::arg("lengths"),
        "Offsets [n+1] of n samples with the given lengths in one concatenated buffer.");
}

}  // namespace leafe
