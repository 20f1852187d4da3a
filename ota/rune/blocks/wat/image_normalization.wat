;; image_normalization.wat: maps an integer image [N, H, W, C] (C = 1 or 3) of u8, i8, u16, i16,
;; u32 or i32 onto [0, 1] as f32 with the same dimensions: (v - lowest) / (highest - lowest),
;; where lowest and highest are the limits of the element type (u8: 0 -> 0, 255 -> 1;
;; i8: -128 -> 0, 127 -> 1). Computed in f64, rounded to f32. No args.

  (data (i32.const 1024) "image_normalization\00")
  (data (i32.const 1056) "image_normalization: input must be an integer image (u8, i8, u16, i16, u32 or i32), not \00")
  (data (i32.const 1152) "image_normalization: input must be [N, H, W, C] with 1 or 3 channels\00")

  (func $fleet_transform (export "fleet_transform") (param $inputs i32) (param $count i32)
                         (result i32)
    (local $r i32) (local $t i32) (local $n i32) (local $src i32) (local $data i32)
    (local $desc i32) (local $i i32) (local $c i32) (local $lo f64) (local $span f64)
    (local.set $r (call $p_expect_one (local.get $inputs) (local.get $count) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (local.set $t (call $p_type (local.get $inputs)))
    (if (i32.gt_u (i32.sub (local.get $t) (i32.const 1)) (i32.const 5))
      (then
        (call $p_msg_begin)
        (call $p_msg_z (i32.const 1056))
        (call $p_msg_type (local.get $t))
        (return (call $p_msg_fail))))
    (local.set $c (call $p_dim (local.get $inputs) (i32.const 3)))
    (if (i32.or (i32.ne (call $p_rank (local.get $inputs)) (i32.const 4))
                (i32.and (i32.ne (local.get $c) (i32.const 1)) (i32.ne (local.get $c) (i32.const 3))))
      (then (return (call $p_fail_z (i32.const 1152)))))
    ;; the type's lowest value and its range (highest - lowest)
    (block $set
      (block $i32
        (block $u32
          (block $i16
            (block $u16
              (block $i8
                (block $u8
                  (br_table $u8 $u8 $i8 $u16 $i16 $u32 $i32 (local.get $t)))
                (local.set $lo (f64.const 0)) (local.set $span (f64.const 255)) (br $set))
              (local.set $lo (f64.const -128)) (local.set $span (f64.const 255)) (br $set))
            (local.set $lo (f64.const 0)) (local.set $span (f64.const 65535)) (br $set))
          (local.set $lo (f64.const -32768)) (local.set $span (f64.const 65535)) (br $set))
        (local.set $lo (f64.const 0)) (local.set $span (f64.const 4294967295)) (br $set))
      (local.set $lo (f64.const -2147483648)) (local.set $span (f64.const 4294967295)))
    (local.set $n (call $p_count (local.get $inputs)))
    (local.set $src (call $p_data (local.get $inputs)))
    (if (i64.gt_u (i64.shl (i64.extend_i32_u (local.get $n)) (i64.const 2)) (i64.const 0xFFFFFFFF))
      (then (return (call $p_oom))))
    (local.set $data (call $p_out (i32.shl (local.get $n) (i32.const 2))))
    (if (i32.eqz (local.get $data)) (then (return (call $p_oom))))
    (local.set $desc (call $p_new_desc (i32.const 7) (i32.const 4) (local.get $data)
                                       (i32.shl (local.get $n) (i32.const 2))))
    (if (i32.eqz (local.get $desc)) (then (return (call $p_oom))))
    (call $p_copy_dims (local.get $desc) (local.get $inputs))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (f32.store (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 2)))
          (f32.demote_f64
            (f64.div (f64.sub (call $p_load (local.get $t) (local.get $src) (local.get $i))
                              (local.get $lo))
                     (local.get $span))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $p_ok (local.get $desc) (i32.const 1)))
