// safron._core: thin numpy bindings. Each function validates its arrays (std::invalid_argument ->
// ValueError, naming the offending shape), pulls out raw pointers, and releases the GIL while the
// C++ core computes, so reading, inference and accumulation can overlap in Python threads.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "safron/accumulate.h"
#include "safron/band_layout.h"
#include "safron/blend.h"
#include "safron/build_info.h"
#include "safron/errors.h"
#include "safron/grid.h"
#include "safron/noise.h"
#include "safron/pyramid.h"

namespace py = pybind11;
using safron::concat;
using safron::require;

namespace {

using Int64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

std::string dims(const py::array& array, const py::ssize_t* values) {
  std::string text = "(";
  for (py::ssize_t axis = 0; axis < array.ndim(); ++axis) {
    text += (axis ? ", " : "") + std::to_string(values[axis]);
  }
  return text + (array.ndim() == 1 ? ",)" : ")");
}

std::string describe(const py::array& array) {
  return concat(py::str(array.dtype()).cast<std::string>(), " array of shape ",
                dims(array, array.shape()));
}

std::string describe_with_strides(const py::array& array) {
  return concat(describe(array), " and strides ", dims(array, array.strides()));
}

py::array_t<std::int64_t> readonly_copy(const std::vector<std::int64_t>& values) {
  py::array_t<std::int64_t> array(static_cast<py::ssize_t>(values.size()), values.data());
  array.attr("setflags")(py::arg("write") = false);
  return array;
}

safron::DType patch_dtype(const py::array& patches, int patch) {
  const py::dtype dtype = patches.dtype();
  const bool float_type = dtype.kind() == 'f' && dtype.attr("isnative").cast<bool>();
  const bool shape_ok = patches.ndim() == 4 && patches.shape(1) == 3 && patches.shape(2) == patch &&
                        patches.shape(3) == patch;
  require(float_type && (dtype.itemsize() == 4 || dtype.itemsize() == 2) && shape_ok &&
              (patches.flags() & py::array::c_style),
          "patches must be a C-contiguous float32 or float16 array of shape (N, 3, ", patch, ", ",
          patch, "); got ", describe_with_strides(patches));
  return dtype.itemsize() == 4 ? safron::DType::F32 : safron::DType::F16;
}

// Positions may be any integer sequence (an int64 array, a list, int32...).
Int64Array positions(const py::object& values, std::int64_t n, const char* name) {
  const py::array array = py::array::ensure(values);
  require(static_cast<bool>(array), name, " must be an integer array of shape (", n,
          ",) (one per patch); got ", py::str(py::type::of(values)).cast<std::string>());
  const char kind = array.dtype().kind();
  require((kind == 'i' || kind == 'u') && array.ndim() == 1 && array.shape(0) == n, name,
          " must be an integer array of shape (", n, ",) (one per patch); got ", describe(array));
  return Int64Array::ensure(array);
}

// The output must be uint8 [rows, width, 3] with contiguous RGB rows; the row stride is free, so a
// slice of a larger (e.g. memory-mapped) canvas works, columns included (canvas[a:b, c0:c1]).
std::pair<std::uint8_t*, std::int64_t> output_rows(py::array& out, std::int64_t rows,
                                                   std::int64_t width) {
  const bool layout_ok = out.dtype().kind() == 'u' && out.dtype().itemsize() == 1 &&
                         out.ndim() == 3 && out.shape(0) == rows && out.shape(1) == width &&
                         out.shape(2) == 3 && (width == 1 || out.strides(1) == 3) &&
                         out.strides(2) == 1;
  require(layout_ok, "out must be a uint8 array of shape (", rows, ", ", width,
          ", 3) whose rows are contiguous; got ", describe_with_strides(out));
  require(out.writeable(), "out must be writable; got a read-only ", describe(out));
  // A one-row view may carry any stride; the core only needs rows not to overlap.
  const std::int64_t stride = rows > 1 ? out.strides(0) : width * 3;
  return {static_cast<std::uint8_t*>(out.mutable_data()), stride};
}

safron::CudaStream as_stream(std::uintptr_t stream) {
  return reinterpret_cast<safron::CudaStream>(stream);
}

// col_end=None means the width. Checked here, before `out` is checked against the range's width,
// so that a bad range is reported as such.
template <class Accumulator>
std::int64_t column_end(const Accumulator& band, std::int64_t col_begin,
                        std::optional<std::int64_t> col_end) {
  const std::int64_t end = col_end.value_or(band.width());
  safron::detail::checked_column_range(col_begin, end, band.width());
  return end;
}

// Raw band rows as (sums [rows, width, 3], weights [rows, width]); `read` fills the two buffers
// with the GIL released.
template <class Accumulator, class Read>
py::tuple band_rows(const Accumulator& band, std::int64_t row_begin, std::int64_t row_end,
                    const Read& read) {
  require(row_end >= row_begin, "invalid row range [", row_begin, ", ", row_end, ")");
  py::array_t<float> sums({row_end - row_begin, band.width(), std::int64_t{3}});
  py::array_t<float> weights({row_end - row_begin, band.width()});
  float* sums_data = sums.mutable_data();
  float* weights_data = weights.mutable_data();
  {
    py::gil_scoped_release release;
    read(sums_data, weights_data);
  }
  return py::make_tuple(sums, weights);
}

// What the CPU and CUDA accumulators share in Python: the constructor and the band's properties.
template <class Accumulator>
void bind_band_common(py::class_<Accumulator>& cls) {
  cls.def(py::init([](std::int64_t width, std::int64_t capacity_rows, int patch, int overlap,
                      const std::string& blend) {
            return std::make_unique<Accumulator>(width, capacity_rows, patch, overlap,
                                                 safron::parse_blend_mode(blend));
          }),
          py::arg("width"), py::arg("capacity_rows"), py::arg("patch") = 256,
          py::arg("overlap") = 20, py::arg("blend") = "uniform");
  cls.def_property_readonly("width", &Accumulator::width)
      .def_property_readonly_static(
          "block_cols", [](const py::object&) { return safron::kBlockCols; },
          "Columns per block: column ranges given to finalise and discard start at a multiple of "
          "it and end at one or at the width; finalising each block once no later patch touches "
          "it keeps memory independent of the width.")
      .def_property_readonly("capacity_rows", &Accumulator::capacity_rows)
      .def_property_readonly("patch", &Accumulator::patch)
      .def_property_readonly("overlap", &Accumulator::overlap)
      .def_property_readonly("blend", [](const Accumulator& self) {
        return std::string(safron::blend_mode_name(self.blend()));
      });
}

void bind_plan(py::module_& m) {
  py::class_<safron::PatchPlan>(m, "PatchPlan",
                                "Patch positions covering a height x width image (see grid.h).")
      .def(
          py::init([](std::int64_t height, std::int64_t width, int patch, int margin, int overlap) {
            return safron::make_plan(height, width, safron::PatchGeometry{patch, margin, overlap});
          }),
          py::arg("height"), py::arg("width"), py::arg("patch") = 256, py::arg("margin") = 20,
          py::arg("overlap") = 20)
      .def_property_readonly(
          "ys", [](const safron::PatchPlan& p) { return readonly_copy(p.ys()); },
          "Top row of each patch row (int64, sorted).")
      .def_property_readonly(
          "xs", [](const safron::PatchPlan& p) { return readonly_copy(p.xs()); },
          "Left column of each patch column (int64, sorted).")
      .def_property_readonly("rows", &safron::PatchPlan::rows)
      .def_property_readonly("cols", &safron::PatchPlan::cols)
      .def_property_readonly("count", &safron::PatchPlan::count)
      .def_property_readonly("height", &safron::PatchPlan::height)
      .def_property_readonly("width", &safron::PatchPlan::width)
      .def_property_readonly("patch", [](const safron::PatchPlan& p) { return p.geometry().patch; })
      .def_property_readonly("margin",
                             [](const safron::PatchPlan& p) { return p.geometry().margin; })
      .def_property_readonly("overlap",
                             [](const safron::PatchPlan& p) { return p.geometry().overlap; })
      .def_property_readonly("window",
                             [](const safron::PatchPlan& p) { return p.geometry().window(); })
      .def_property_readonly("stride",
                             [](const safron::PatchPlan& p) { return p.geometry().stride(); })
      .def(
          "origins",
          [](const safron::PatchPlan& p, std::int64_t begin, std::optional<std::int64_t> end) {
            const std::int64_t stop = end.value_or(p.count());
            require(0 <= begin && begin <= stop && stop <= p.count(), "patch index range [", begin,
                    ", ", stop, ") is not within [0, ", p.count(), ")");
            py::array_t<std::int64_t> ys(stop - begin), xs(stop - begin);
            auto y = ys.mutable_unchecked<1>();
            auto x = xs.mutable_unchecked<1>();
            for (std::int64_t k = begin; k < stop; ++k) {
              const safron::PatchOrigin origin = p.origin(k);
              y(k - begin) = origin.y;
              x(k - begin) = origin.x;
            }
            return py::make_tuple(ys, xs);
          },
          py::arg("begin") = 0, py::arg("end") = py::none(),
          "(ys, xs) int64 arrays: output origin of patches begin..end-1 in raster order.")
      .def("final_rows_end", &safron::PatchPlan::final_rows_end, py::arg("patch_row"),
           "Output rows [0, final_rows_end(i)) are final once patch rows 0..i are accumulated.")
      .def("first_row_touching", &safron::PatchPlan::first_row_touching, py::arg("y"),
           "Smallest patch row whose rows [ys[i], ys[i] + patch) contain output row y.")
      .def("__len__", &safron::PatchPlan::count)
      .def("__repr__", [](const safron::PatchPlan& p) {
        return concat("PatchPlan(height=", p.height(), ", width=", p.width(),
                      ", patch=", p.geometry().patch, ", margin=", p.geometry().margin,
                      ", overlap=", p.geometry().overlap, ": ", p.rows(), "x", p.cols(),
                      " patches)");
      });
}

void bind_cpu_accumulator(py::module_& m) {
  using safron::BandAccumulator;
  py::class_<BandAccumulator> cls(
      m, "BandAccumulator", "Rolling band of fp32 sums and weights on the CPU (see accumulate.h).");
  bind_band_common(cls);
  cls.def(
          "add",
          [](BandAccumulator& self, const py::array& patches, const py::object& ys,
             const py::object& xs, std::int64_t image_height) {
            const safron::DType dtype = patch_dtype(patches, self.patch());
            const std::int64_t n = patches.shape(0);
            const Int64Array patch_ys = positions(ys, n, "ys");
            const Int64Array patch_xs = positions(xs, n, "xs");
            py::gil_scoped_release release;
            self.add(patches.data(), dtype, n, patch_ys.data(), patch_xs.data(), image_height);
          },
          py::arg("patches"), py::arg("ys"), py::arg("xs"), py::arg("image_height"),
          "Blend float32/float16 patches [N, 3, P, P] in [-1, 1] whose top-left output pixels are "
          "(ys[k], xs[k]).")
      .def(
          "finalise",
          [](BandAccumulator& self, std::int64_t row_begin, std::int64_t row_end, py::array& out,
             std::int64_t col_begin, std::optional<std::int64_t> col_end) {
            const std::int64_t end = column_end(self, col_begin, col_end);
            const auto [pixels, stride] = output_rows(out, row_end - row_begin, end - col_begin);
            py::gil_scoped_release release;
            return self.finalise(row_begin, row_end, col_begin, end, pixels, stride);
          },
          py::arg("row_begin"), py::arg("row_end"), py::arg("out"), py::arg("col_begin") = 0,
          py::arg("col_end") = py::none(),
          "Write rows [row_begin, row_end) x columns [col_begin, col_end) (default: the whole "
          "width; whole blocks of block_cols) as uint8 RGB into out [rows, columns, 3], zero them, "
          "and return the number of pixels that had no weight (0 unless the plan missed pixels).")
      .def(
          "discard",
          [](BandAccumulator& self, std::int64_t row_begin, std::int64_t row_end,
             std::int64_t col_begin, std::optional<std::int64_t> col_end) {
            const std::int64_t end = column_end(self, col_begin, col_end);
            py::gil_scoped_release release;
            self.discard(row_begin, row_end, col_begin, end);
          },
          py::arg("row_begin"), py::arg("row_end"), py::arg("col_begin") = 0,
          py::arg("col_end") = py::none(),
          "Zero rows [row_begin, row_end) x columns [col_begin, col_end) without writing them.")
      .def(
          "read_rows",
          [](const BandAccumulator& self, std::int64_t row_begin, std::int64_t row_end) {
            return band_rows(self, row_begin, row_end, [&](float* sums, float* weights) {
              self.read_rows(row_begin, row_end, sums, weights);
            });
          },
          py::arg("row_begin"), py::arg("row_end"),
          "(sums float32 [R, W, 3], weights float32 [R, W]) copies of band rows, for diagnostics.")
      .def("set_num_threads", &BandAccumulator::set_num_threads, py::arg("num_threads"),
           "Worker threads for add/finalise; 0 = one per hardware thread (the default).")
      .def_property_readonly("num_threads", &BandAccumulator::num_threads);
}

void bind_cuda_accumulator(py::module_& m) {
  using safron::CudaBandAccumulator;
  py::class_<CudaBandAccumulator> cls(
      m, "CudaBandAccumulator",
      "The band accumulator in device memory; takes raw device pointers and a cudaStream_t as int. "
      "Raises RuntimeError when built without CUDA or when no GPU is usable.");
  bind_band_common(cls);
  cls.def(
          "add",
          [](CudaBandAccumulator& self, std::uintptr_t patches_ptr, const std::string& dtype,
             std::int64_t n, const py::object& ys, const py::object& xs, std::int64_t image_height,
             std::uintptr_t stream) {
            const safron::DType patch_dtype = safron::parse_dtype(dtype);
            const Int64Array patch_ys = positions(ys, n, "ys");
            const Int64Array patch_xs = positions(xs, n, "xs");
            py::gil_scoped_release release;
            self.add(reinterpret_cast<const void*>(patches_ptr), patch_dtype, n, patch_ys.data(),
                     patch_xs.data(), image_height, as_stream(stream));
          },
          py::arg("patches_ptr"), py::arg("dtype"), py::arg("n"), py::arg("ys"), py::arg("xs"),
          py::arg("image_height"), py::arg("stream") = 0,
          "Blend n patches [n, 3, P, P] ('float32' or 'float16') at device address patches_ptr.")
      .def(
          "finalise",
          [](CudaBandAccumulator& self, std::int64_t row_begin, std::int64_t row_end,
             std::uintptr_t out_ptr, std::int64_t col_begin, std::optional<std::int64_t> col_end,
             std::optional<std::int64_t> out_row_stride_bytes, std::uintptr_t stream) {
            const std::int64_t end = column_end(self, col_begin, col_end);
            py::gil_scoped_release release;
            return self.finalise(row_begin, row_end, col_begin, end,
                                 reinterpret_cast<std::uint8_t*>(out_ptr),
                                 out_row_stride_bytes.value_or((end - col_begin) * 3),
                                 as_stream(stream));
          },
          py::arg("row_begin"), py::arg("row_end"), py::arg("out_ptr"), py::arg("col_begin") = 0,
          py::arg("col_end") = py::none(), py::arg("out_row_stride_bytes") = py::none(),
          py::arg("stream") = 0,
          "Write rows x columns [col_begin, col_end) (default: the whole width) as uint8 RGB to "
          "out_ptr (device or pinned host memory; row stride defaults to (col_end - col_begin)*3), "
          "zero them, synchronise the stream and return the zero-weight count.")
      .def(
          "discard",
          [](CudaBandAccumulator& self, std::int64_t row_begin, std::int64_t row_end,
             std::int64_t col_begin, std::optional<std::int64_t> col_end, std::uintptr_t stream) {
            const std::int64_t end = column_end(self, col_begin, col_end);
            py::gil_scoped_release release;
            self.discard(row_begin, row_end, col_begin, end, as_stream(stream));
          },
          py::arg("row_begin"), py::arg("row_end"), py::arg("col_begin") = 0,
          py::arg("col_end") = py::none(), py::arg("stream") = 0)
      .def(
          "read_rows",
          [](const CudaBandAccumulator& self, std::int64_t row_begin, std::int64_t row_end,
             std::uintptr_t stream) {
            return band_rows(self, row_begin, row_end, [&](float* sums, float* weights) {
              self.read_rows(row_begin, row_end, sums, weights, as_stream(stream));
            });
          },
          py::arg("row_begin"), py::arg("row_end"), py::arg("stream") = 0)
      .def_property_readonly("device", &CudaBandAccumulator::device);
}

void bind_noise(py::module_& m) {
  m.def(
      "fill_noise",
      [](py::array& out, const py::object& y0s, const py::object& x0s, std::uint32_t seed,
         int threads) {
        const py::dtype dtype = out.dtype();
        const bool layout_ok = dtype.kind() == 'f' && dtype.itemsize() == 4 &&
                               dtype.attr("isnative").cast<bool>() && out.ndim() == 4 &&
                               (out.flags() & py::array::c_style);
        require(layout_ok,
                "out must be a C-contiguous float32 array (n, channels, height, width); got ",
                describe_with_strides(out));
        require(out.writeable(), "out must be writable; got a read-only ", describe(out));
        const std::int64_t n = out.shape(0);
        const Int64Array top = positions(y0s, n, "y0s");
        const Int64Array left = positions(x0s, n, "x0s");
        const safron::NoiseWindows windows{n,           out.shape(1), out.shape(2), out.shape(3),
                                           top.data(), left.data(),  seed};
        float* data = static_cast<float*>(out.mutable_data());
        py::gil_scoped_release release;
        safron::fill_noise(windows, data, threads);
      },
      py::arg("out"), py::arg("y0s"), py::arg("x0s"), py::arg("seed"), py::arg("threads") = 1,
      "Fill out [n, channels, height, width] with the canvas noise of the windows whose top-left "
      "canvas pixels are (y0s[k], x0s[k]) (safron/noise.h), on `threads` threads (0: all).");
  m.def(
      "fill_noise_cuda",
      [](std::uintptr_t out_ptr, std::int64_t n, std::int64_t channels, std::int64_t height,
         std::int64_t width, const py::object& y0s, const py::object& x0s, std::uint32_t seed,
         std::uintptr_t stream) {
        const Int64Array top = positions(y0s, n, "y0s");
        const Int64Array left = positions(x0s, n, "x0s");
        const safron::NoiseWindows windows{n,          channels,    height, width,
                                           top.data(), left.data(), seed};
        py::gil_scoped_release release;
        safron::fill_noise_cuda(windows, reinterpret_cast<float*>(out_ptr), as_stream(stream));
      },
      py::arg("out_ptr"), py::arg("n"), py::arg("channels"), py::arg("height"), py::arg("width"),
      py::arg("y0s"), py::arg("x0s"), py::arg("seed"), py::arg("stream") = 0,
      "fill_noise into float32 device memory at out_ptr, queued on `stream`. Raises RuntimeError "
      "when built without CUDA.");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "safron C++/CUDA core: patch plan, blend windows and band accumulators.";
  bind_plan(m);
  m.def(
      "blend_window",
      [](const std::string& mode, int patch, int overlap) {
        const std::vector<float> ramp =
            safron::blend_ramp(safron::parse_blend_mode(mode), patch, overlap);
        return py::array_t<float>(static_cast<py::ssize_t>(ramp.size()), ramp.data());
      },
      py::arg("mode"), py::arg("patch") = 256, py::arg("overlap") = 20,
      "The 1-D blend ramp r(t), float32 [patch]; the 2-D window is r(ty) * r(tx).");
  m.def(
      "halve_rgb",
      [](const py::array_t<std::uint8_t>& image) {
        require(image.ndim() == 3 && image.shape(2) == 3 && image.shape(0) > 0 && image.shape(1) > 0,
                "halve_rgb takes a non-empty uint8 (height, width, 3) array, got ", describe(image));
        require(image.strides(2) == 1 && image.strides(1) == 3 && image.strides(0) > 0,
                "halve_rgb needs contiguous pixels within each row, got strides ", dims(image, image.strides()));
        const py::ssize_t height = image.shape(0), width = image.shape(1);
        py::array_t<std::uint8_t> reduced({(height + 1) / 2, (width + 1) / 2, py::ssize_t{3}});
        const std::uint8_t* in = image.data();
        std::uint8_t* out = reduced.mutable_data();
        const py::ssize_t in_stride = image.strides(0), out_stride = reduced.strides(0);
        {
          py::gil_scoped_release release;
          safron::halve_rgb(in, height, width, in_stride, out, out_stride);
        }
        return reduced;
      },
      py::arg("image"),
      "2x2 mean of a uint8 (h, w, 3) image, rounded half up, ceil(h/2) x ceil(w/2); rows may be strided.");
  bind_noise(m);
  m.def("blend_modes", [] {
    std::vector<std::string> names;
    for (std::string_view name : safron::blend_mode_names()) names.emplace_back(name);
    return names;
  });
  bind_cpu_accumulator(m);
  bind_cuda_accumulator(m);
  m.def("cuda_device_count", &safron::cuda_device_count);
  m.def("build_info", [] {
    const safron::BuildInfo info = safron::build_info();
    py::dict result;
    result["cuda"] = info.cuda;
    result["cuda_architectures"] = info.cuda_architectures;
    result["cuda_runtime_version"] = info.cuda_runtime_version;
    result["cuda_device_count"] = info.cuda_device_count;
    result["compiler"] = info.compiler;
    result["version"] = info.version;
    return result;
  });
}
