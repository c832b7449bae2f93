#include "engine/core/tensor.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "engine/core/error.h"
#include "engine/core/formats.h"

namespace dsv4 {

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size(), 1);
  int64_t running = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = running;
    running *= std::max<int64_t>(shape[i], 1);
  }
  return strides;
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const Shape& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

namespace {

// Storage element indices of every element of a view, in row-major order.
std::vector<int64_t> element_offsets(const Shape& shape, const Shape& strides, int64_t offset) {
  const int64_t n = shape_numel(shape);
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(n));
  if (n == 0) return out;
  std::vector<int64_t> idx(shape.size(), 0);
  int64_t pos = offset;
  for (int64_t k = 0; k < n; ++k) {
    out.push_back(pos);
    for (size_t d = shape.size(); d-- > 0;) {
      if (++idx[d] < shape[d]) {
        pos += strides[d];
        break;
      }
      pos -= strides[d] * (shape[d] - 1);
      idx[d] = 0;
    }
  }
  return out;
}

// Copies element `src` of one packed buffer to element `dst` of another, bit-exactly.
void copy_element(DType dtype, const uint8_t* src_base, int64_t src, uint8_t* dst_base, int64_t dst) {
  if (dtype == DType::f4_e2m1) {
    fp4_set(dst_base, dst, fp4_get(src_base, src));
    return;
  }
  const int64_t size = dtype_bits(dtype) / 8;
  std::memcpy(dst_base + dst * size, src_base + src * size, static_cast<size_t>(size));
}

}  // namespace

Tensor::Tensor(std::shared_ptr<Storage> storage, DType dtype, Shape shape, Shape strides, int64_t offset)
    : storage_(std::move(storage)), dtype_(dtype), shape_(std::move(shape)), strides_(std::move(strides)), offset_(offset) {}

Tensor Tensor::empty(const Shape& shape, DType dtype, Allocator& allocator, std::string name) {
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) throw ContractError("Tensor::empty", name, "negative size in shape " + shape_str(shape));
  }
  const int64_t bytes = dtype_storage_bytes(dtype, shape_numel(shape));
  auto storage = allocator.allocate(static_cast<size_t>(bytes), dtype, std::move(name));
  return Tensor(std::move(storage), dtype, shape, contiguous_strides(shape), 0);
}

Tensor Tensor::over(std::shared_ptr<Storage> storage, DType dtype, const Shape& shape, int64_t offset) {
  if (!storage) throw ContractError("Tensor::over", "storage", "is null");
  for (int64_t s : shape) {
    if (s < 0) throw ContractError("Tensor::over", storage->owner(), "negative size in shape " + shape_str(shape));
  }
  if (offset < 0) throw ContractError("Tensor::over", storage->owner(), "negative offset");
  const int64_t need = dtype_storage_bytes(dtype, offset + shape_numel(shape));
  if (need > static_cast<int64_t>(storage->bytes())) {
    throw ContractError("Tensor::over", storage->owner(),
                        "a view of " + shape_str(shape) + " at element " + std::to_string(offset) + " needs " +
                            std::to_string(need) + " bytes, the storage has " + std::to_string(storage->bytes()));
  }
  return Tensor(std::move(storage), dtype, shape, contiguous_strides(shape), offset);
}

Tensor Tensor::empty(const Shape& shape, DType dtype, std::string name) {
  return empty(shape, dtype, default_host_allocator(), std::move(name));
}

Tensor Tensor::from_values(const Shape& shape, DType dtype, const std::vector<double>& values, std::string name) {
  Tensor t = empty(shape, dtype, std::move(name));
  DSV4_ASSERT(static_cast<int64_t>(values.size()) == t.numel(), "from_values: value count != numel");
  auto* base = static_cast<uint8_t*>(t.storage_->data());
  for (size_t i = 0; i < values.size(); ++i) store_element_f64(dtype, base, static_cast<int64_t>(i), values[i]);
  return t;
}

const std::string& Tensor::name() const {
  static const std::string undefined = "<undefined>";
  return storage_ ? storage_->owner() : undefined;
}

Device Tensor::device() const { return storage_ ? storage_->device() : Device{}; }

int64_t Tensor::storage_elements() const {
  if (!storage_) return 0;
  const auto bytes = static_cast<int64_t>(storage_->bytes());
  return dtype_bits(dtype_) == 4 ? bytes * 2 : bytes / (dtype_bits(dtype_) / 8);
}

int64_t Tensor::wrap_dim(int64_t d, int64_t dims, const char* op) const {
  if (d < -dims || d >= dims) {
    throw ContractError(op, name(), "dim " + std::to_string(d) + " out of range for " + std::to_string(dims) + " dims");
  }
  return d < 0 ? d + dims : d;
}

int64_t Tensor::size(int64_t d) const { return shape_[static_cast<size_t>(wrap_dim(d, dim(), "size"))]; }
int64_t Tensor::stride(int64_t d) const { return strides_[static_cast<size_t>(wrap_dim(d, dim(), "stride"))]; }

bool Tensor::is_contiguous() const {
  if (numel() == 0) return true;
  int64_t expected = 1;
  for (size_t i = shape_.size(); i-- > 0;) {
    if (shape_[i] == 1) continue;
    if (strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

Tensor Tensor::narrow(int64_t d, int64_t start, int64_t length) const {
  d = wrap_dim(d, dim(), "narrow");
  const int64_t n = shape_[static_cast<size_t>(d)];
  if (start < 0 || length < 0 || start + length > n) {
    throw ContractError("narrow", name(), "range [" + std::to_string(start) + ", " + std::to_string(start + length) +
                                              ") outside dim " + std::to_string(d) + " of size " + std::to_string(n));
  }
  Shape shape = shape_;
  shape[static_cast<size_t>(d)] = length;
  return Tensor(storage_, dtype_, shape, strides_, offset_ + start * strides_[static_cast<size_t>(d)]);
}

Tensor Tensor::slice(int64_t d, int64_t start, int64_t end, int64_t step) const {
  d = wrap_dim(d, dim(), "slice");
  if (step < 1) throw ContractError("slice", name(), "step must be >= 1");
  const int64_t n = shape_[static_cast<size_t>(d)];
  // Python-style clamping of out-of-range bounds, negative bounds counted from the end.
  auto clamp_bound = [n](int64_t v) { return std::clamp<int64_t>(v < 0 ? v + n : v, 0, n); };
  start = clamp_bound(start);
  end = std::max(clamp_bound(end), start);
  Shape shape = shape_;
  Shape strides = strides_;
  shape[static_cast<size_t>(d)] = (end - start + step - 1) / step;
  strides[static_cast<size_t>(d)] *= step;
  return Tensor(storage_, dtype_, shape, strides, offset_ + start * strides_[static_cast<size_t>(d)]);
}

Tensor Tensor::select(int64_t d, int64_t index) const {
  d = wrap_dim(d, dim(), "select");
  const int64_t n = shape_[static_cast<size_t>(d)];
  if (index < -n || index >= n) {
    throw ContractError("select", name(), "index " + std::to_string(index) + " outside dim of size " + std::to_string(n));
  }
  if (index < 0) index += n;
  Shape shape = shape_;
  Shape strides = strides_;
  const int64_t off = offset_ + index * strides_[static_cast<size_t>(d)];
  shape.erase(shape.begin() + d);
  strides.erase(strides.begin() + d);
  return Tensor(storage_, dtype_, shape, strides, off);
}

Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  d0 = wrap_dim(d0, dim(), "transpose");
  d1 = wrap_dim(d1, dim(), "transpose");
  Shape shape = shape_;
  Shape strides = strides_;
  std::swap(shape[static_cast<size_t>(d0)], shape[static_cast<size_t>(d1)]);
  std::swap(strides[static_cast<size_t>(d0)], strides[static_cast<size_t>(d1)]);
  return Tensor(storage_, dtype_, shape, strides, offset_);
}

Tensor Tensor::permute(const std::vector<int64_t>& dims) const {
  if (static_cast<int64_t>(dims.size()) != dim()) throw ContractError("permute", name(), "needs one entry per dim");
  Shape shape(dims.size());
  Shape strides(dims.size());
  std::vector<bool> used(dims.size(), false);
  for (size_t i = 0; i < dims.size(); ++i) {
    const auto d = static_cast<size_t>(wrap_dim(dims[i], dim(), "permute"));
    if (used[d]) throw ContractError("permute", name(), "dim " + std::to_string(d) + " repeated");
    used[d] = true;
    shape[i] = shape_[d];
    strides[i] = strides_[d];
  }
  return Tensor(storage_, dtype_, shape, strides, offset_);
}

Tensor Tensor::unsqueeze(int64_t d) const {
  d = wrap_dim(d, dim() + 1, "unsqueeze");
  Shape shape = shape_;
  Shape strides = strides_;
  // The new dim's stride is irrelevant to contiguity; PyTorch uses size*stride of the next dim.
  const int64_t s = d < dim() ? shape_[static_cast<size_t>(d)] * strides_[static_cast<size_t>(d)] : 1;
  shape.insert(shape.begin() + d, 1);
  strides.insert(strides.begin() + d, s);
  return Tensor(storage_, dtype_, shape, strides, offset_);
}

Tensor Tensor::as_strided(const Shape& shape, const Shape& strides, int64_t offset) const {
  if (shape.size() != strides.size()) throw ContractError("as_strided", name(), "shape and strides differ in length");
  if (offset < 0) throw ContractError("as_strided", name(), "negative storage offset");
  int64_t last = offset;
  bool empty = false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) throw ContractError("as_strided", name(), "negative size");
    if (strides[i] < 0) throw ContractError("as_strided", name(), "negative stride");
    if (shape[i] == 0) empty = true;
    else last += (shape[i] - 1) * strides[i];
  }
  if (!empty && last >= storage_elements()) {
    throw ContractError("as_strided", name(), "view reaches element " + std::to_string(last) + " of a storage of " +
                                                  std::to_string(storage_elements()));
  }
  return Tensor(storage_, dtype_, shape, strides, offset);
}

std::optional<Tensor> Tensor::try_view(const Shape& requested) const {
  // Resolve one -1.
  Shape shape = requested;
  int64_t infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      if (infer >= 0) throw ContractError("view", name(), "only one dim can be -1");
      infer = static_cast<int64_t>(i);
    } else if (shape[i] < 0) {
      throw ContractError("view", name(), "negative size in " + shape_str(requested));
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    if (known == 0 || numel() % known != 0) {
      throw ContractError("view", name(), "cannot infer -1 in " + shape_str(requested) + " for " + std::to_string(numel()) + " elements");
    }
    shape[static_cast<size_t>(infer)] = numel() / known;
  }
  if (shape_numel(shape) != numel()) {
    throw ContractError("view", name(), "shape " + shape_str(requested) + " does not hold " + std::to_string(numel()) + " elements");
  }
  if (numel() == 0 || shape_.empty()) return Tensor(storage_, dtype_, shape, contiguous_strides(shape), offset_);

  // Walk both shapes from the innermost dim, matching each run of old dims that is contiguous in
  // memory ("chunk") with a run of new dims of the same element count.
  Shape strides(shape.size(), 1);
  int64_t view_d = static_cast<int64_t>(shape.size()) - 1;
  int64_t chunk_stride = strides_.back();
  int64_t chunk_numel = 1;
  int64_t view_numel = 1;
  for (int64_t d = dim() - 1; d >= 0; --d) {
    chunk_numel *= shape_[static_cast<size_t>(d)];
    const bool chunk_ends = d == 0 || (shape_[static_cast<size_t>(d - 1)] != 1 &&
                                       strides_[static_cast<size_t>(d - 1)] != chunk_numel * chunk_stride);
    if (!chunk_ends) continue;
    while (view_d >= 0 && (view_numel < chunk_numel || shape[static_cast<size_t>(view_d)] == 1)) {
      strides[static_cast<size_t>(view_d)] = view_numel * chunk_stride;
      view_numel *= shape[static_cast<size_t>(view_d)];
      --view_d;
    }
    if (view_numel != chunk_numel) return std::nullopt;
    if (d > 0) {
      chunk_stride = strides_[static_cast<size_t>(d - 1)];
      chunk_numel = 1;
      view_numel = 1;
    }
  }
  if (view_d != -1) return std::nullopt;
  return Tensor(storage_, dtype_, shape, strides, offset_);
}

Tensor Tensor::view(const Shape& shape) const {
  auto v = try_view(shape);
  if (!v) {
    throw ContractError("view", name(), "shape " + shape_str(shape) + " is not a view of shape " + shape_str(shape_) +
                                            " with strides " + shape_str(strides_) + "; use reshape() to copy");
  }
  return *v;
}

Tensor Tensor::reshape(const Shape& shape) const {
  if (auto v = try_view(shape)) return *v;
  return contiguous().view(shape);
}

void Tensor::require_host(const char* op) const {
  if (!storage_) throw ContractError(op, name(), "tensor is undefined");
  if (device().kind != DeviceKind::host) throw ContractError(op, name(), "needs a host tensor, got " + device().str());
}

Tensor Tensor::clone(const std::string& new_name) const {
  if (!storage_) throw ContractError("clone", name(), "tensor is undefined");
  Allocator allocator = Allocator::of(*storage_);
  Tensor out = empty(shape_, dtype_, allocator, new_name);
  const std::vector<int64_t> src = element_offsets(shape_, strides_, offset_);
  if (src.empty()) return out;
  if (device().kind == DeviceKind::host) {
    const auto* s = static_cast<const uint8_t*>(storage_->data());
    auto* d = static_cast<uint8_t*>(out.storage_->data());
    for (size_t i = 0; i < src.size(); ++i) copy_element(dtype_, s, src[i], d, static_cast<int64_t>(i));
    return out;
  }
  // Device: gather on the host through a copy of the whole storage.
  std::vector<uint8_t> whole(storage_->bytes());
  storage_->space().copy_to_host(whole.data(), storage_->data(), whole.size());
  std::vector<uint8_t> packed(out.storage_->bytes());
  for (size_t i = 0; i < src.size(); ++i) copy_element(dtype_, whole.data(), src[i], packed.data(), static_cast<int64_t>(i));
  out.storage_->space().copy_from_host(out.storage_->data(), packed.data(), packed.size());
  return out;
}

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return clone(name() + ".contiguous");
}

Tensor Tensor::to(Allocator& allocator) const {
  Tensor src = contiguous();
  Tensor out = empty(shape_, dtype_, allocator, name());
  const size_t bytes = out.storage_->bytes();
  if (bytes == 0) return out;
  if (src.dtype_ == DType::f4_e2m1 && src.offset_ % 2 != 0) src = clone(name());
  std::vector<uint8_t> staging(bytes);
  src.storage_->space().copy_to_host(staging.data(), src.data_ptr(), bytes);
  out.storage_->space().copy_from_host(out.storage_->data(), staging.data(), bytes);
  return out;
}

int64_t Tensor::element_index(const std::vector<int64_t>& index) const {
  if (static_cast<int64_t>(index.size()) != dim()) {
    throw ContractError("index", name(), "expects " + std::to_string(dim()) + " indices");
  }
  int64_t pos = offset_;
  for (size_t i = 0; i < index.size(); ++i) {
    if (index[i] < 0 || index[i] >= shape_[i]) {
      throw ContractError("index", name(), "index " + std::to_string(index[i]) + " outside dim " + std::to_string(i) +
                                              " of size " + std::to_string(shape_[i]));
    }
    pos += index[i] * strides_[i];
  }
  return pos;
}

double Tensor::get(const std::vector<int64_t>& index) const {
  require_host("get");
  return load_element_f64(dtype_, storage_->data(), element_index(index));
}

void Tensor::set(const std::vector<int64_t>& index, double value) {
  require_host("set");
  store_element_f64(dtype_, storage_->data(), element_index(index), value);
}

std::vector<double> Tensor::values() const {
  if (!storage_) throw ContractError("values", name(), "tensor is undefined");
  Tensor host = device().kind == DeviceKind::host ? *this : to(default_host_allocator());
  std::vector<double> out;
  for (int64_t e : element_offsets(host.shape_, host.strides_, host.offset_)) {
    out.push_back(load_element_f64(dtype_, host.storage_->data(), e));
  }
  return out;
}

void Tensor::fill(double value) {
  require_host("fill");
  for (int64_t e : element_offsets(shape_, strides_, offset_)) store_element_f64(dtype_, storage_->data(), e, value);
}

void* Tensor::data_ptr() const {
  if (!storage_) throw ContractError("data_ptr", name(), "tensor is undefined");
  if (dtype_ == DType::f4_e2m1) {
    if (offset_ % 2 != 0) throw ContractError("data_ptr", name(), "fp4 view starts mid-byte (odd offset)");
    return static_cast<uint8_t*>(storage_->data()) + offset_ / 2;
  }
  return static_cast<uint8_t*>(storage_->data()) + offset_ * (dtype_bits(dtype_) / 8);
}

}  // namespace dsv4
