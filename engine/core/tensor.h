// A strided view of a Storage: shape, strides in elements, a storage offset in elements and a dtype.
// Views share storage; contiguity follows PyTorch's rule (dims of size 1 ignore their stride, an
// empty tensor is contiguous). fp4 tensors address single e2m1 values: element e lives in byte e/2,
// low nibble first.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/core/allocator.h"
#include "engine/core/dtype.h"

namespace dsv4 {

using Shape = std::vector<int64_t>;

Shape contiguous_strides(const Shape& shape);
int64_t shape_numel(const Shape& shape);
std::string shape_str(const Shape& shape);

class Tensor {
 public:
  Tensor() = default;  // undefined: defined() is false

  static Tensor empty(const Shape& shape, DType dtype, Allocator& allocator, std::string name);
  static Tensor empty(const Shape& shape, DType dtype, std::string name);  // default host allocator
  // A host tensor filled from doubles (converted by the dtype's encoder).
  static Tensor from_values(const Shape& shape, DType dtype, const std::vector<double>& values,
                            std::string name);
  // A contiguous view of `shape` over existing storage, starting at element `offset` (a runtime
  // buffer seen as a tensor). ContractError when the view does not fit the storage.
  static Tensor over(std::shared_ptr<Storage> storage, DType dtype, const Shape& shape, int64_t offset = 0);

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t offset() const { return offset_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t d) const;
  int64_t stride(int64_t d) const;
  int64_t numel() const { return shape_numel(shape_); }
  const std::string& name() const;
  Device device() const;
  const std::shared_ptr<Storage>& storage() const { return storage_; }
  // Elements the storage can hold.
  int64_t storage_elements() const;

  bool is_contiguous() const;

  // Views (share storage). Dims may be negative (counted from the end) where PyTorch allows it.
  Tensor narrow(int64_t d, int64_t start, int64_t length) const;
  Tensor slice(int64_t d, int64_t start, int64_t end, int64_t step = 1) const;
  Tensor select(int64_t d, int64_t index) const;
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor permute(const std::vector<int64_t>& dims) const;
  Tensor unsqueeze(int64_t d) const;
  Tensor as_strided(const Shape& shape, const Shape& strides, int64_t offset) const;
  // A view with a new shape when the strides allow one (one -1 is inferred); nullopt otherwise.
  std::optional<Tensor> try_view(const Shape& shape) const;
  Tensor view(const Shape& shape) const;     // ContractError when no view exists
  Tensor reshape(const Shape& shape) const;  // a view when possible, else a contiguous copy

  // A contiguous tensor with the same values (this one if already contiguous).
  Tensor contiguous() const;
  Tensor clone(const std::string& name) const;
  // A copy in another allocator's memory (host <-> device), contiguous.
  Tensor to(Allocator& allocator) const;

  // Host element access; `index` has one entry per dim.
  double get(const std::vector<int64_t>& index) const;
  void set(const std::vector<int64_t>& index, double value);
  // Every element in row-major order, as doubles (copies device tensors to the host first).
  std::vector<double> values() const;
  void fill(double value);

  // Address of element 0 (byte-aligned: for fp4 the offset must be even).
  void* data_ptr() const;
  template <class T>
  T* data() const {
    return static_cast<T*>(data_ptr());
  }
  // Linear element index into the storage of a multi-index.
  int64_t element_index(const std::vector<int64_t>& index) const;

 private:
  Tensor(std::shared_ptr<Storage> storage, DType dtype, Shape shape, Shape strides, int64_t offset);
  int64_t wrap_dim(int64_t d, int64_t dims, const char* op) const;
  void require_host(const char* op) const;

  std::shared_ptr<Storage> storage_;
  DType dtype_ = DType::f32;
  Shape shape_;
  Shape strides_;
  int64_t offset_ = 0;
};

}  // namespace dsv4
